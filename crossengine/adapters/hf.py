"""Hugging Face transformers engine: AutoModelForCausalLM, or AutoModelForImageTextToText
when the checkpoint has a vision tower; PEFT adapters (unmerged or merged); generation.

What it shares with the native engine (tokenisation, inputs, arrays) is in torch_engine.py.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import Field, model_validator

from .base import EngineInfo, EngineTraits, Generation, Sample, SampleError
from .checkpoint import lora_info
from .hf_generate import generate
from .torch_engine import TorchEngine
from .torch_spec import TorchSpec


class HFSpec(TorchSpec):
    """transformers' own fields; `options` are `from_pretrained` keyword arguments."""

    attn_implementation: str | None = Field(None, description="HF attention backend: eager, sdpa, flash_attention_2 ...")
    lora_merge: bool = Field(False, description="Merge the LoRA adapter into the weights before scoring (PEFT merge_and_unload).")

    @model_validator(mode="after")
    def _merge_needs_adapter(self) -> HFSpec:
        if self.lora_merge and not self.lora:
            raise ValueError("lora_merge needs a lora adapter")
        return self


class HFEngine(TorchEngine):
    name = "hf"
    Spec = HFSpec
    traits = EngineTraits(
        captures_modules=True, audits_buffers=True, lora=True, batching=True, reports_routing=True, replays_routing=True, tensor_logits=True, chunks_logits=True, refits=True, processes_logprobs=True
    )

    def _load_model(self, common: dict):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForImageTextToText if self.is_vision else AutoModelForCausalLM
        kwargs = dict(common, dtype=self.dtype, **self.spec.options)
        if self.spec.attn_implementation:
            kwargs["attn_implementation"] = self.spec.attn_implementation
        model, info = cls.from_pretrained(self.model_path, output_loading_info=True, **kwargs)
        self.missing_keys = sorted(info.get("missing_keys", []))  # the audit names them
        return self._with_adapter(model.to(self.device)).eval()

    def _with_adapter(self, model):
        """The spec's LoRA adapter on `model` with PEFT, as a trainer runs it (unmerged) or merged."""
        if not self.spec.lora:
            return model
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, self.spec.lora)
        return model.merge_and_unload() if self.spec.lora_merge else model

    def load_weights(self, weights: list) -> None:
        """Copy each (checkpoint name, tensor) into the parameter or buffer of that name, cast to its dtype, in place: what a
        trainer's sync into an HF rollout model does. A name the model lacks or a shape that differs is one line naming it."""
        import torch

        state = self.model.state_dict(keep_vars=True)  # tied weights under both names
        with torch.no_grad():
            for name, tensor in weights:
                target = state.get(name)
                if target is None:
                    raise ValueError(f"parameter {name!r} is not in the model (its names: {next(iter(state))!r}, ...)")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"parameter {name!r}: shape {tuple(tensor.shape)} pushed into {tuple(target.shape)}")
                target.data.copy_(tensor.to(target.device))

    def parameters(self):
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach().cpu()

    def info(self) -> EngineInfo:
        info = super().info()
        info.extra["attn_implementation"] = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if self.spec.lora:
            info.extra["lora"] = lora_info(self.spec.lora, self.spec.lora_merge)
        return info

    def forward_logits(self, sample: Sample):
        """Raw logits [T, V] in float32 for one sample; the one place HF's forward is called."""
        import torch

        with self.forward_clock(), torch.inference_mode():
            return self.model(**self._inputs(sample)).logits[0].float()

    def forward_hidden(self, sample: Sample):
        """(last hidden states [T, H], head) from one forward: a pre-hook on the output layer keeps its input and
        hands it the last position only, so the [T, V] logits are never made; head() is that layer, with the
        final soft-capping where the config has one (Gemma), in the model's dtype, then float32 as forward_logits."""

        import torch

        layer = self.model.get_output_embeddings()
        seen: dict[str, Any] = {}
        me = threading.get_ident()

        def keep(module, args):
            if threading.get_ident() != me:  # another thread's call of this layer (its worker serves blocks while this forward runs)
                return None
            seen["h"] = args[0]
            return (args[0][..., -1:, :], *args[1:])

        hook = layer.register_forward_pre_hook(keep)
        try:
            with self.forward_clock(), torch.inference_mode():
                self.model(**self._inputs(sample))
        finally:
            hook.remove()
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)

        def head(rows):
            with torch.inference_mode():
                y = layer.forward(rows)  # not layer(): hooks (this one, on a later forward) are for forwards only
                if cap:
                    y = torch.tanh(y / cap) * cap
                return y.float()

        return seen["h"][0], head

    def _forward_rows(self, input_ids, attention_mask, position_ids):
        import torch

        with torch.inference_mode():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()

    def generate(self, samples: list[Sample], sampling: Any, top_k: int) -> list[list[Generation] | SampleError]:

        return generate(self, samples, sampling, top_k)
