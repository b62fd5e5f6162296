"""Sampling and greedy decoding with an HF model, returning the engine's own log-probs.

The log-prob of each sampled token is taken from the raw logits (before temperature or
top-p), as vLLM's default `raw_logprobs` mode does, so the two generators report the same
quantity and gen_kl means what it means in RL trainers; with the experiment's
`sampling.logprobs: processed` (`engine.score_as`) from the logits as the sampler processed
them, as vLLM's `processed_logprobs` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Generation, Sample, SampleError
from .blocks import topk_from_logprobs
from .sampling import processed


def generate(engine, samples: list[Sample], sampling: Any, top_k: int) -> list[list[Generation] | SampleError]:
    import torch

    out: list[list[Generation] | SampleError] = []
    for s in samples:
        invalid = engine.invalid(s, extra_tokens=sampling.max_tokens)
        if invalid is not None:
            out.append(invalid)
            continue
        seed = sampling.seed if sampling.seed is not None else engine.seed
        torch.manual_seed(seed)
        greedy = sampling.temperature == 0
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=not greedy,
            num_return_sequences=sampling.n,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.tokenizer.eos_token_id,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else None)
        with torch.inference_mode():
            res = engine.model.generate(**engine._inputs(s), **kwargs)
        prompt_len = len(s)
        logits = torch.stack(res.logits, dim=1).float()  # [n, G, V], raw
        logprobs = (logits if engine.score_as is None else processed(logits, engine.score_as)).log_softmax(-1)
        eos = engine.tokenizer.eos_token_id
        gens = []
        for j in range(res.sequences.shape[0]):
            ids = res.sequences[j, prompt_len:]
            n = len(ids)
            if eos is not None and (ids == eos).any():
                n = int((ids == eos).nonzero()[0, 0]) + 1  # keep the eos, drop the padding after it
            lp = logprobs[j, :n]
            topk_ids, topk_lp = topk_from_logprobs(lp, top_k)
            token_lp = lp.gather(-1, ids[:n, None])[:, 0]
            gens.append(Generation(s.sample_id, ids[:n].cpu().numpy().astype(np.int64), token_lp.cpu().numpy().astype(np.float32), topk_ids, topk_lp))
        out.append(gens)
    return out
