"""Native engines: the model's own code instead of transformers' port of it.

- OLMo-core (`ai2-olmo-core`, AI2's training code) for OLMo-2 checkpoints: the HF state
  dict is converted with OLMo-core's own converter and loaded into its Transformer.
- Any user code: `factory: "package.module:function"` returns a torch module (or callable)
  taking (input_ids, **model_inputs) and returning logits. Optional
  `preprocess: "package.module:function"` is the training code's own input pipeline,
  called as `preprocess(text, images, engine, add_special_tokens=...)` with PIL images and
  returning `input_ids` plus the model's other inputs by its own names (Molmo's uint8
  `images`, `image_input_idx`, `image_masks`, say); without it the checkpoint's HF
  tokenizer/processor prepares prompts. A model that transforms its inputs inside (pixels
  normalised on the device) may define `input_view(**inputs) -> dict` to show them, under
  comparable names, to the input comparison (`inputs: own`). Imported only because the
  experiment names it.

The checkpoint's config.json is read as plain fields when its model type needs remote code
(the native code is the implementation; the port's code is not run unless asked).
Modality tags and the array conversion are shared with the HF engine (torch_engine.py).
HF-only behaviour (transformers' loading, PEFT, generation) is not inherited.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from . import import_ref
from .base import EngineTraits
from .patches import BUILTIN
from .spec import check_callable_ref
from .torch_engine import TorchEngine
from .torch_spec import TorchSpec

OLMO_CORE_TYPES = ("olmo2",)


class NativeSpec(TorchSpec):
    """The training code's own fields: how to build the model, prepare inputs and render chats."""

    factory: str | None = Field(None, description="'module:function' returning the model (called with model_path, config, device, dtype, lora?, **options).")
    preprocess: str | None = Field(None, description="'module:function': the training code's input pipeline, (text, images, engine, add_special_tokens) -> inputs.")
    chat_format: str | None = Field(None, description="'module:function' rendering `messages` (list of {role, content}) to the prompt text, as the training code does.")

    @field_validator("factory", "preprocess", "chat_format")
    @classmethod
    def _refs(cls, v: str | None) -> str | None:
        return check_callable_ref(v)

    @model_validator(mode="after")
    def _fits(self) -> NativeSpec:

        if self.chat_format and self.chat_template:
            raise ValueError("give chat_format (native code) or chat_template (a Jinja file), not both")
        builtin = [p for p in self.patches if p in BUILTIN]
        if builtin:
            raise ValueError(f"built-in patches ({', '.join(builtin)}) change a transformers model; a native engine takes 'module:function' patches")
        return self

    def user_code(self) -> list[tuple[tuple, str]]:
        refs = [((f,), getattr(self, f)) for f in ("factory", "preprocess", "chat_format") if getattr(self, f)]
        return refs + super().user_code()

    @property
    def input_pipeline(self) -> str | None:
        return self.preprocess


class NativeEngine(TorchEngine):
    name = "native"
    Spec = NativeSpec
    # reads a remote-code config as plain fields and runs its own code, never the port's
    traits = EngineTraits(
        captures_modules=True, audits_buffers=True, lora=True, runs_model_code=False, batching=True, reports_routing=True, replays_routing=True, tensor_logits=True, processes_logprobs=True
    )

    def _load_config(self, common: dict):
        from transformers import PretrainedConfig

        try:
            return super()._load_config(common)
        except ValueError:  # a remote-code model type: its fields are enough for native code
            if common.get("trust_remote_code"):
                raise
            fields, _ = PretrainedConfig.get_config_dict(self.model_path, revision=common.get("revision"))
            config = PretrainedConfig(**{k: v for k, v in fields.items() if k not in ("auto_map", "architectures")})
            config.model_type = fields.get("model_type", "")
            return config

    def _load_model(self, common: dict):
        import torch

        self.preprocess = import_ref(self.spec.preprocess) if self.spec.preprocess else None
        if self.spec.factory:
            self.kind = self.spec.factory
            lora = {"lora": self.spec.lora} if self.spec.lora else {}  # the factory applies it its own way
            model = import_ref(self.spec.factory)(model_path=self.model_path, config=self.config, device=self.device, dtype=self.dtype, **lora, **self.spec.options)
        elif self.spec.lora:
            raise ValueError("a LoRA adapter on a native engine goes to its factory (factory: 'module:function', called with lora=PATH)")
        elif self.config.model_type in OLMO_CORE_TYPES:
            self.kind = "olmo-core"
            model = self._olmo_core(common)
        else:
            raise ValueError(f"no native implementation for model_type {self.config.model_type!r}: give factory: 'module:function'")
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
        return model

    def _olmo_core(self, common: dict):
        """OLMo-core's Transformer, configured from the HF config, weights via OLMo-core's converter."""
        from olmo_core.nn.feed_forward import FeedForwardConfig
        from olmo_core.nn.hf.convert import convert_state_from_hf
        from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig
        from transformers import AutoModelForCausalLM

        hc = self.config
        rope = getattr(hc, "rope_parameters", None) or {"rope_theta": hc.rope_theta}
        cfg = TransformerConfig.llama_like(
            d_model=hc.hidden_size,
            vocab_size=hc.vocab_size,
            n_layers=hc.num_hidden_layers,
            n_heads=hc.num_attention_heads,
            n_kv_heads=hc.num_key_value_heads,
            qk_norm=True,
            layer_norm_eps=hc.rms_norm_eps,
            rope_theta=int(rope["rope_theta"]),
            block_name=TransformerBlockType.reordered_norm,
            feed_forward=FeedForwardConfig(hidden_size=hc.intermediate_size, bias=False),
        )
        model = cfg.build(init_device="cpu")
        hf = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype, **common)  # trust_remote_code from the spec
        model.load_state_dict(convert_state_from_hf(hc, hf.state_dict(), model_type=hc.model_type))
        del hf
        return model.to(self.dtype)

    def _load_tokenizer(self, common: dict):
        if self.preprocess is None:
            return super()._load_tokenizer(common)
        from transformers import (
            AutoTokenizer,  # the native pipeline processes images itself
        )

        return AutoTokenizer.from_pretrained(self.model_path, **common), None

    def _encode(self, sid, text, images, add_special_tokens):
        if self.preprocess is None:
            return super()._encode(sid, text, images, add_special_tokens)

        out = {k: np.asarray(v) for k, v in self.preprocess(text, images, self, add_special_tokens=add_special_tokens).items()}
        if "input_ids" not in out:
            raise ValueError(f"preprocess {self.spec.preprocess} returned no input_ids")
        return out.pop("input_ids").reshape(-1).astype(np.int64), out

    def chat_renderer(self):
        """`chat_format: module:function` renders chat turns as the training code does; else the checkpoint's template."""
        return import_ref(self.spec.chat_format) if self.spec.chat_format else super().chat_renderer()

    def forward_logits(self, sample):
        import torch

        with self.forward_clock():
            inputs = self._inputs(sample)
            input_ids = inputs.pop("input_ids")
            with torch.inference_mode():
                out = self.model(input_ids, **inputs)
            logits = getattr(out, "logits", out)
            logits = logits[0] if logits.dim() == 3 else logits
        return logits.float()

    def _forward_rows(self, input_ids, attention_mask, position_ids):
        """The training code's model with a mask and position ids, as its trainer calls it; a model whose
        forward takes neither cannot run padded or packed micro-batches (said once, per sample)."""

        import torch

        params = inspect.signature(getattr(self.model, "forward", self.model)).parameters  # a module, or the function a factory returned
        if not ({"attention_mask", "position_ids"} <= set(params) or any(p.kind == p.VAR_KEYWORD for p in params.values())):
            raise TypeError(f"its model's forward takes no attention_mask and position_ids, so batching: {self.spec.batching} cannot run it")
        with torch.inference_mode():
            out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return getattr(out, "logits", out).float()

    def info(self):
        info = super().info()
        info.implementation = self.kind

        try:
            info.versions["olmo_core"] = version("ai2-olmo-core")
        except PackageNotFoundError:
            pass
        return info

    def generate(self, samples, sampling: Any, top_k: int):
        raise NotImplementedError("native engines score teacher-forced; use an hf or vllm engine as the generator")
