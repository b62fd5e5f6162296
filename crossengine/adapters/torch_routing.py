"""MoE routing on torch engines: each MoE layer's expert choice recorded while a sample is scored,
or the reference's choice replayed (`routing: true | replay`).

Why a mixin apart from TorchEngine: routing is read one sample per forward, with hooks on the
routers found at load (crossengine/adapters/routing.py); scoring without routing never enters here.
"""

from __future__ import annotations

import numpy as np

from crossengine.adapters.base import Sample, SampleError, TokenLogprobs
from crossengine.adapters.routing import captured, find_routers


class RoutedScoring:
    """Mixed into TorchEngine; uses its `spec`, `model`, `instance`, `model_path`, `routers`, `_replay`, `_scores`, `forward_logits`."""

    def report_routing(self) -> None:
        """Find the routers by what they return (crossengine/adapters/routing.py) with one forward of a short probe; a model without any says so."""
        import torch

        if self.spec.batching != "single":
            raise ValueError(f"engine {self.instance!r}: routing is read per sample: give it batching: single")
        probe = Sample("probe", np.array([0, 1, 2, 3], dtype=np.int64), np.zeros(4, np.int8))
        with torch.inference_mode():
            self.routers = find_routers(self.model, lambda: self.forward_logits(probe))
        if not self.routers:
            raise ValueError(
                f"engine {self.instance!r}: no module of {self.model_path} returns router logits, weights and expert ids (a transformers 5 mixture-of-experts router): it cannot report routing"
            )

    def replay_routing(self, routing: dict[str, np.ndarray]) -> None:
        self._replay = dict(routing)  # the batch's, kept for its noise conditions; the next batch's replaces it

    def _score_one(self, s: Sample, top_k: int, full_vocab: bool) -> TokenLogprobs:
        """One sample, one unpadded forward; with routing on, each MoE layer's choice (replayed where the spec says) rides along."""

        if self.routers is None:
            return self._scores(s, top_k, full_vocab)
        replay = self._replay.get(s.sample_id) if self.spec.routing == "replay" else None
        if self.spec.routing == "replay":
            want = (len(s), len(self.routers))
            if replay is None or replay.shape[:2] != want:
                raise SampleError(
                    s.sample_id,
                    f"engine {self.instance!r} replays the reference's routing, and it has "
                    f"{'none' if replay is None else f'shape {replay.shape[:2]}'} for this sample (needs {want}: tokens, MoE layers)",
                )
        with captured(self.routers, replay) as got:
            out = self._scores(s, top_k, full_vocab)
        out.routing, out.router_margin = got[0]
        return out
