"""An engine from outside the package, as a user would write one (docs/reference/engines.md, "Adding an engine").

`type: tests.custom_engine:ScaledHF` in an experiment runs it: the HF engine with its own
field (`temperature`, dividing the logits) and its own traits (no LoRA, no module capture,
a KV cache to plan for). Everything the core does with it, it learns from these.
"""

from __future__ import annotations

from pydantic import Field

from crossengine.adapters.base import EngineTraits
from crossengine.adapters.hf import HFEngine, HFSpec


class ScaledSpec(HFSpec):
    temperature: float = Field(1.0, gt=0, description="Logits are divided by this before the log-softmax.")


class ScaledHF(HFEngine):
    name = "scaled-hf"
    Spec = ScaledSpec
    traits = EngineTraits(needs_kv_cache=True)

    def forward_logits(self, sample):
        return super().forward_logits(sample) / self.spec.temperature


class NotAnEngine:
    """Named as a type, it must be refused in one line before anything starts."""
