"""Logits a block of positions at a time, and the rows every engine derives from them.

Why blocks: at a 152k vocabulary one 8k-token sample's logits are 5 GB in float32;
`placement.logits_budget_gb` bounds what a worker holds by scoring and comparing a block of
positions at a time (HeadRows applies the output layer per block).
"""

from __future__ import annotations

import numpy as np


class LogitRows:
    """Full-vocabulary logits [T, V] of one sample that are never held whole: `rows(a, b)` gives rows a..b-1
    (row t predicts token t, row 0 NaN, as `TokenLogprobs.logits`) computed or fetched on demand. An engine
    hands one over for a sample whose logits exceed its worker's budget (`placement.logits_budget_gb`);
    `block` is how many rows a consumer should ask for at a time to stay within it."""

    shape: tuple[int, int]
    block: int

    def rows(self, a: int, b: int):
        raise NotImplementedError


class HeadRows(LogitRows):
    """Logits computed a block at a time from the last hidden states and the model's output layer (`head`)."""

    def __init__(self, hidden, head, vocab: int, block: int):
        self.hidden, self.head = hidden, head  # hidden [T-1, H]: position t-1's state predicts token t
        self.shape, self.block = (hidden.shape[0] + 1, vocab), block

    def rows(self, a: int, b: int):
        import torch

        out = torch.empty((b - a, self.shape[1]), dtype=torch.float32, device=self.hidden.device)
        lo = max(a, 1)
        if a == 0:
            out[0] = float("nan")
        if b > lo:
            out[lo - a :] = self.head(self.hidden[lo - 1 : b - 1])
        return out


def logit_block(logits, a: int, b: int):
    """Rows a..b-1 of full logits: an array, a tensor, or a LogitRows computing them on demand."""
    return logits.rows(a, b) if isinstance(logits, LogitRows) else logits[a:b]


def block_rows(elements: int, *sources) -> int:
    """Rows per block for reading these [T, V] sources together: `elements` logits per block at most, and no more
    than any LogitRows among them asks for (its `block`)."""
    n, vocab = sources[0].shape
    return min([max(1, elements // max(vocab, 1))] + [getattr(x, "block", n) for x in sources])


def blocks(n: int, step: int, start: int = 0) -> list[tuple[int, int]]:
    """[start, n) in blocks of `step` rows; a last block of one row joins the one before (a one-row matrix product
    takes another code path, whose numbers differ in the last bit)."""
    edges = list(range(start, n, max(1, step))) + [n]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


def shifted_rows(pred, as_tensor: bool = False):
    """float32 [T, V] from a torch [T-1, V] whose row t-1 predicts token t: row 0 NaN (it predicts nothing), in one
    allocation and one copy (full-vocabulary logits are the largest array a run moves). Host numpy, or with
    `as_tensor` a torch tensor where `pred` is (a GPU's logits stay on it for Ray Direct Transport)."""
    if as_tensor:
        import torch

        out = torch.empty((pred.shape[0] + 1, pred.shape[1]), dtype=torch.float32, device=pred.device)
        out[0] = float("nan")
        out[1:] = pred
        return out
    out = np.empty((pred.shape[0] + 1, pred.shape[1]), np.float32)
    out[0] = np.nan
    out[1:] = pred.detach().float().cpu().numpy()
    return out


def topk_from_logprobs(logprobs, k: int):
    """Top-k of a [T, V] torch tensor of log-probs, as numpy (shared by torch engines)."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return ids.cpu().numpy().astype(np.int64), values.float().cpu().numpy()
