"""Alignment: every engine must have scored exactly the reference's expanded token ids.

An engine that tokenises or expands images differently is reported, naming the sample and
the first differing position; it is never papered over by re-aligning sequences.
"""

from __future__ import annotations

import numpy as np

from crossengine.adapters.base import Sample, SampleError, TokenLogprobs


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """Index of the first position where two id sequences differ (a length change counts)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if len(diff):
        return int(diff[0])
    return None if len(a) == len(b) else n


def check_ids(sample: Sample, engine: str, ids: np.ndarray) -> SampleError | None:
    pos = first_difference(sample.input_ids, ids)
    if pos is None:
        return None
    ref_tok = int(sample.input_ids[pos]) if pos < len(sample) else "<end>"
    got = int(ids[pos]) if pos < len(ids) else "<end>"
    return SampleError(
        sample.sample_id,
        f"engine {engine!r} has token {got} at position {pos} where the reference has {ref_tok} (first difference)",
    )


def check_scores(sample: Sample, engine: str, ref: TokenLogprobs, cand: TokenLogprobs) -> SampleError | None:
    """Both score arrays must cover every position of the sample's ids."""
    for who, out in (("reference", ref), (engine, cand)):
        if out.scored_ids is not None:
            err = check_ids(sample, who, out.scored_ids)
            if err is not None:
                return err
        if len(out.token_logprobs) != len(sample):
            return SampleError(sample.sample_id, f"engine {who!r} returned {len(out.token_logprobs)} positions for {len(sample)} tokens")
    return None
