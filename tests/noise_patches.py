"""A planted batch effect for the noise-floor tests, named from experiments as "tests.noise_patches:batch_dependent".

One module (layer 1's MLP) scales its output by 1 + 1e-2 × (rows in the batch − 1): a sample
scored alone is untouched, bitwise, so no single-condition run can see it; a padded micro-batch
of several rows moves it. The kind of bug a batch-size-dependent kernel makes.
"""

from __future__ import annotations


def batch_dependent(engine) -> str:
    mlp = engine.model.model.layers[1].mlp

    def hook(module, args, output):
        rows = args[0].shape[0]
        return output if rows == 1 else output * (1 + 1e-2 * (rows - 1))

    mlp.register_forward_hook(hook)
    return "layer 1's MLP output scaled by 1 + 1e-2 × (batch rows − 1)"


def logit_nudge(engine) -> str:
    """A planted difference of about 1e-4 in every log-prob: the output layer's logits get a fixed bias of
    ±1e-4 per token id (seeded), so log p(t) moves by b_t − Σ p_i b_i, far above float32's rounding and
    bitwise the same under every batching condition (the engine's own floor stays 0)."""
    import torch

    head = engine.model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    bias = (torch.randint(0, 2, (head.out_features,), generator=g) * 2 - 1).to(torch.float32) * 1e-4

    def hook(module, args, output):
        return output + bias.to(output.dtype)

    head.register_forward_hook(hook)
    return "the output layer's logits + a fixed ±1e-4 bias per token id"
