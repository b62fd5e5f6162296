"""Generation mode: a generator samples completions; every engine rescores them teacher-forced.

This is the RL setting: the rollout engine (say vLLM) samples tokens with its own
log-probs, the trainer (the reference) scores the same tokens. Three things come out:

- teacher-forced rows for every candidate over prompt + completion (segment column);
- "sampled" rows: the generator's own sampling-time log-probs vs the reference, on the
  completion only (variant = "sampled"): the gen_kl a trainer would log;
- greedy mode only: per sample, the first position where a candidate's own greedy decode
  leaves the reference's, with both tokens and both log-probs (greedy.parquet).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from crossengine.adapters.base import Generation, Sample, SampleError, TokenLogprobs
from crossengine.columns import MODALITIES


def extend_samples(batch: list[Sample], generations: list, special_ids: set[int]) -> tuple[list[Sample], list[Generation], list[SampleError]]:
    """prompt + completion as new samples (id `sid` or `sid#j` for n > 1), with their generations."""
    samples, gens, errors = [], [], []
    for s, out in zip(batch, generations):
        if isinstance(out, SampleError):
            errors.append(out)
            continue
        for j, g in enumerate(out):
            sid = s.sample_id if len(out) == 1 else f"{s.sample_id}#{j}"
            comp_modality = np.where(np.isin(g.completion_ids, list(special_ids)), MODALITIES.index("special"), MODALITIES.index("text")).astype(np.int8)
            samples.append(
                dataclasses.replace(
                    s,
                    sample_id=sid,
                    input_ids=np.concatenate([s.input_ids, g.completion_ids]),
                    modality=np.concatenate([s.modality, comp_modality]),
                    prompt_len=len(s),
                )
            )
            gens.append(dataclasses.replace(g, sample_id=sid))
    return samples, gens, errors


def sampled_scores(sample: Sample, gen: Generation) -> TokenLogprobs:
    """The generator's sampling-time log-probs laid out like a teacher-forced score (prompt = NaN)."""
    n, p = len(sample), sample.prompt_len
    k = gen.topk_ids.shape[1]
    token_lp = np.full(n, np.nan, np.float32)
    topk_ids = np.full((n, k), -1, np.int64)
    topk_lp = np.full((n, k), np.nan, np.float32)
    token_lp[p:], topk_ids[p:], topk_lp[p:] = gen.token_logprobs, gen.topk_ids, gen.topk_logprobs
    return TokenLogprobs(token_lp, topk_ids, topk_lp, attention=np.zeros(n, np.int8))


GREEDY_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("ref_engine", pa.string()),
        ("cand_engine", pa.string()),
        ("variant", pa.string()),
        ("first_divergence", pa.int32()),  # index into the completion; -1: identical decodes
        ("position", pa.int32()),  # the same, as a position in prompt + completion
        ("ref_token", pa.int32()),
        ("cand_token", pa.int32()),
        ("ref_token_text", pa.string()),
        ("cand_token_text", pa.string()),
        ("ref_lp", pa.float32()),  # each engine's log-prob of its own token there
        ("cand_lp", pa.float32()),
        ("ref_len", pa.int32()),
        ("cand_len", pa.int32()),
    ]
)


def greedy_divergence(sample_id: str, prompt_len: int, ref: Generation, cand: Generation, ref_name: str, cand_engine: str, variant: str, vocab_text: list[str]) -> dict:
    """Where two greedy decodes of one prompt part ways (a length difference counts)."""
    n = min(len(ref.completion_ids), len(cand.completion_ids))
    diff = np.flatnonzero(ref.completion_ids[:n] != cand.completion_ids[:n])
    first = int(diff[0]) if len(diff) else (n if len(ref.completion_ids) != len(cand.completion_ids) else -1)
    tok = lambda g: int(g.completion_ids[first]) if 0 <= first < len(g.completion_ids) else None  # noqa: E731
    lp = lambda g: float(g.token_logprobs[first]) if 0 <= first < len(g.completion_ids) else None  # noqa: E731
    text = lambda t: vocab_text[t] if t is not None and t < len(vocab_text) else None  # noqa: E731
    return {
        "sample_id": sample_id,
        "ref_engine": ref_name,
        "cand_engine": cand_engine,
        "variant": variant,
        "first_divergence": first,
        "position": first + prompt_len if first >= 0 else -1,
        "ref_token": tok(ref),
        "cand_token": tok(cand),
        "ref_token_text": text(tok(ref)),
        "cand_token_text": text(tok(cand)),
        "ref_lp": lp(ref),
        "cand_lp": lp(cand),
        "ref_len": len(ref.completion_ids),
        "cand_len": len(cand.completion_ids),
    }
