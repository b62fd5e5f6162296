"""User code for the native-engine tests, named from experiments as "tests.native_factories:...".

`hf_as_native` wraps a transformers model behind the native interface: (input_ids, **inputs)
-> logits. `scale_logits` is a user patch that really changes the numbers.
"""

from __future__ import annotations


def hf_as_native(model_path, config, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return lambda input_ids, **inputs: model(input_ids=input_ids, **inputs).logits


def no_inputs(sample, engine):
    return {}


def scale_logits(engine) -> str:
    head = engine.model.get_output_embeddings()
    head.weight.data.mul_(1.01)
    return "output embedding scaled by 1.01"
