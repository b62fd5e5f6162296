"""Which quantity a log-prob is: raw, or processed by a sampler (temperature, top-k, top-p), and that processing.

Why in the adapters: a torch engine scores the processed quantity itself when a dump in the run declares it
(`Engine.score_as`), and the comparison's sampling check (crossengine/compare/sampling.py) reads logits the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """How log-probs were made from logits: raw (temperature 1, nothing filtered) or processed."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    @property
    def raw(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

    def says(self) -> str:
        if self.raw:
            return "raw (temperature 1, unfiltered)"
        parts = ([f"temperature {self.temperature:g}"] if self.temperature != 1.0 else []) + ([f"top_k {self.top_k}"] if self.top_k else []) + ([f"top_p {self.top_p:g}"] if self.top_p < 1 else [])
        return "processed (" + ", ".join(parts) + ")"


def processed(logits, reading: Reading):
    """Logits [N, V] as the sampler sees them: divided by the temperature, tokens outside top-k/top-p at -inf (the smallest
    set whose probability reaches top_p, the most probable token always kept, as vLLM and transformers filter)."""
    import torch

    z = logits.float() / reading.temperature
    if reading.top_k and reading.top_k < z.shape[-1]:
        kth = torch.topk(z, reading.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if reading.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
        drop = before >= reading.top_p
        drop[..., 0] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z
