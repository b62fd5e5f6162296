"""A planted router difference for the routing tests, named from experiments as "tests.moe_patches:nudge_gate".

Layer 2's router weights move by 10 % of their own spread (seeded): every other weight is the
reference's, so any flip below layer 2 would be a bug of the comparison, flips concentrate where
the reference's router was nearly tied, and replaying the reference's routing removes most of
the gap where routing flipped (what is left comes from the nudged logits' softmax weights on the
same experts, as at every other token).
"""

from __future__ import annotations

LAYER = 2


def nudge_gate(engine) -> str:
    import torch

    gate = engine.model.model.layers[LAYER].mlp.gate
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.add_(0.1 * gate.weight.std() * torch.randn(gate.weight.shape, generator=g).to(gate.weight))
    return f"layer {LAYER}'s router weights nudged by 10 % of their spread"
