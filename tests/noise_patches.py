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
