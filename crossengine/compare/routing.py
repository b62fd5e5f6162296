"""MoE routing parity: where two engines' routers chose different experts, in the candidate's worker.

Both sides' `TokenLogprobs.routing` ([T, L, k] expert ids per input position and MoE layer) and the
reference's `router_margin` ([T, L]) become, per sample, `RoutingRows` (the routing/ parts: one
row per input position and layer) and the token column `routing_flips`: at the row of token t,
the number of layers whose choice differed at position t − 1, the position whose hidden state
predicts token t. A flip is a different *set* of experts (the order of the top-k is not a flip).

numpy only: runs in engine environments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossengine.adapters.base import TokenLogprobs


@dataclass
class RoutingRows:
    """One sample's routing on both sides, one entry per input position and MoE layer."""

    sample_id: str
    token_ids: np.ndarray  # int64 [T]
    ref: np.ndarray  # int16 [T, L, k]
    cand: np.ndarray  # int16 [T, L, k]
    flip: np.ndarray  # bool [T, L]
    margin_ref: np.ndarray  # float32 [T, L]
    margin_cand: np.ndarray  # float32 [T, L]


def flips(ref: TokenLogprobs, cand: TokenLogprobs) -> np.ndarray | None:
    """bool [T, L]: the two sides chose different sets of experts; None unless both report routing of the same shape. A row
    a side did not record (-1: a dump's last token) is no flip."""
    if ref.routing is None or cand.routing is None or ref.routing.shape[:2] != cand.routing.shape[:2]:
        return None
    known = (ref.routing >= 0).all(-1) & (cand.routing >= 0).all(-1)
    return (np.sort(ref.routing, -1) != np.sort(cand.routing, -1)).any(-1) & known


def routing_column(f: np.ndarray | None, n: int) -> np.ndarray:
    """routing_flips at every row (row 0 included; token_rows slices) from `flips`: flips of position t − 1 at row t, −1 (null) unknown."""
    out = np.full(n, -1, np.int32)
    if f is not None:
        out[1:] = f.sum(-1)[: n - 1]
    return out


def routing_rows(sample_id: str, token_ids: np.ndarray, ref: TokenLogprobs, cand: TokenLogprobs, f: np.ndarray) -> RoutingRows:
    """The routing/ rows of one sample whose `flips` are `f`."""
    return RoutingRows(sample_id, token_ids, ref.routing, cand.routing, f, ref.router_margin, cand.router_margin)
