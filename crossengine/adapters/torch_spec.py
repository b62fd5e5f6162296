"""The experiment fields every torch engine takes (hf and native alike), and the device and dtype they name.

Why apart from TorchEngine: the experiment's schema reads these fields without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .patches import (
    BUILTIN,  # built-in ones are HF-only: config rejects them on native engines
)
from .spec import CALLABLE_REF, EngineSpec


class TorchSpec(EngineSpec):
    """Fields of the engines that run a torch module in the worker (hf, native)."""

    drop_inputs: list[str] = Field(default_factory=list, description="Model inputs to withhold, e.g. token_type_ids.")
    patches: list[str] = Field(default_factory=list, description="Built-in patch names (hf) or 'module:function' refs.")

    batching: Literal["single", "padded", "packed"] = Field(
        "single",
        description="single: one unpadded forward per sample; padded: micro-batches of padded rows; packed: each micro-batch "
        "concatenated into one row (position ids restart per sample, block-diagonal mask), as remove-padding trainers run.",
    )
    padding_side: Literal["right", "left"] = Field("right", description="batching: padded: where the padding goes (position ids follow the mask).")
    micro_batch_size: int = Field(1, ge=1, description="batching: padded or packed: samples per forward pass.")
    routing: Literal["own", "replay"] = Field(
        "own", description="replay: a MoE model routes with the reference's expert choices (Rollout Routing Replay, the trainer side); needs the experiment's `routing: true`."
    )

    @property
    def replays_reference_routing(self) -> bool:
        return self.routing == "replay"

    @model_validator(mode="after")
    def _batching_fields(self) -> TorchSpec:
        if self.batching == "single" and self.micro_batch_size > 1:
            raise ValueError("micro_batch_size needs batching: padded or packed (single runs one sample per forward)")
        if self.batching != "padded" and self.padding_side != "right":
            raise ValueError("padding_side goes with batching: padded")
        if self.routing == "replay" and self.batching != "single":
            raise ValueError("routing: replay needs batching: single (routing is read per sample)")
        return self

    @field_validator("patches")
    @classmethod
    def _patch_names(cls, v: list[str]) -> list[str]:

        for ref in v:
            if ref not in BUILTIN and not CALLABLE_REF.match(ref):
                raise ValueError(f"unknown patch {ref!r}; built-in patches: {', '.join(sorted(BUILTIN))}, or 'package.module:function'")
        return v

    def user_code(self) -> list[tuple[tuple, str]]:
        return [(("patches", j), p) for j, p in enumerate(self.patches) if CALLABLE_REF.match(p)] + super().user_code()


def resolve_device(device: str | None) -> str:
    """auto -> cuda when torch sees one, else cpu (as nanoGPT does)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
