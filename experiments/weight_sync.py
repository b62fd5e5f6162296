"""Sync functions for experiments/weight-sync.yaml, in the form `refit.update` calls: function(target, weights).

`weights` holds the checkpoint's tensors by name (what a trainer would hand over after its own name conversion);
`target.load_weights(pairs)` writes (name, tensor) pairs into the live engine. Each function below plants one fault a
real sync has had, so that the run shows how it is named.
"""

from __future__ import annotations

SKIPPED = "lm_head.weight"  # an untied output head a conversion forgot (it handled the tied case only)


def skip_one(target, weights) -> None:
    """Every tensor but the output head: the rollout keeps sampling from the old head."""
    target.load_weights((name, t) for name, t in weights.items() if name != SKIPPED)


def bf16_round_trip(target, weights) -> None:
    """Every tensor sent as bfloat16 and cast back: what a bf16 transport does to float32 weights."""
    import torch

    target.load_weights((name, t.to(torch.bfloat16).float()) for name, t in weights.items())


def fails(target, weights) -> None:
    """Sync code that raises, as a conversion that meets an unexpected name does."""
    raise KeyError(f"no rule to convert {next(iter(weights))!r}")
