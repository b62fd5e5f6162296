"""An engine's fields in the experiment file: the ones every engine takes, and the base each engine's own options model extends.

Why they live beside the adapters and not in `crossengine.experiment`: an engine's fields are
part of the engine (one file declares what it runs and what it takes), and the worker that
runs it, possibly in another Python environment (vLLM's venv), rebuilds its spec from JSON
with that engine's own model. `crossengine.experiment.schema` dispatches each `engines.NAME`
entry to the model its `type` registers (crossengine.adapters.spec_model); a field the engine
does not declare is a one-line error naming the field and the engine type.

An engine adds fields by subclassing `EngineSpec` and naming the subclass as its `Spec`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
CALLABLE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_callable_ref(v: str | None) -> str | None:
    """A user code reference must be spelled 'package.module:function' (nothing else is imported)."""
    if v is not None and not CALLABLE_REF.match(v):
        raise ValueError(f"{v!r} is not of the form 'package.module:function'")
    return v


class Strict(BaseModel):
    """Every experiment and sweep type: unknown keys refused, values frozen, and no NaN or infinity where a
    number is meant (one rule for every float field: `.inf`, `.nan` are one-line errors naming the field).
    A number written `2e-3` is a string to YAML 1.1 (PyYAML needs `2.0e-3`); it is read as the number it
    spells, which is what the user meant (docs/reference/experiment.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class EnvSpec(Strict):
    """Where an engine's worker runs: its own pip environment or an existing interpreter."""

    pip: list[str] | None = Field(None, description="Packages for a Ray runtime_env, e.g. ['transformers==4.57.6'].")
    python: str | None = Field(None, description="Path to another environment's python (Ray py_executable).")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables for the worker.")

    @model_validator(mode="after")
    def _one_kind(self) -> EnvSpec:
        if self.pip and self.python:
            raise ValueError("give either pip or python, not both")
        return self


class RefitSpec(Strict):
    """An engine's in-place weight update, as an RL trainer does it (docs/guides/weight-sync.md): load `model`, score, push
    each checkpoint of `to` into the live engine, score again; then the same checkpoints loaded fresh are the control."""

    to: list[str] = Field(min_length=1, description="Checkpoint(s) pushed in, in order (fixture names, paths or hub ids): a chain scores after each push.")
    reset_prefix_cache: bool = Field(True, description="Drop the engine's prefix cache after each push, as frameworks should; false shows what a stale cache does.")
    update: str | None = Field(
        None,
        description="Your own sync code, 'package.module:function', called as function(target, weights) with the checkpoint's "
        "tensors by name; it pushes them with target.load_weights(pairs). Default: every tensor, as is.",
    )
    labels: list[str] | None = Field(None, description="How each step is named in the output; default: `to` as written.")

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("update")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return check_callable_ref(v)

    def label(self, step: int) -> str:
        """The name step `step` (0-based) goes by in lines and tables."""
        return (self.labels or self.to)[step]


class EngineSpec(Strict):
    """The fields every engine takes. Fields left out inherit the experiment's model, dtype and device."""

    type: str = Field(description="Which adapter runs it: a registered engine (`crossengine engines`) or 'package.module:Class'.")
    model: str | None = Field(None, description="Fixture name, local path or hub id; default: the experiment's model.")
    dtype: Dtype | None = Field(None, description="Weights and compute dtype; default: the experiment's.")
    device: str | None = Field(None, description="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run the model repo's own Python code. Off unless set.")
    env: EnvSpec | None = Field(None, description="Run this engine in its own Python environment.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs for this engine's worker; default 1 on a GPU cluster, else 0.")
    options: dict[str, Any] = Field(default_factory=dict, description="Engine-specific keyword arguments for its loader (from_pretrained, vllm.LLM, a factory).")
    lora: str | None = Field(None, description="A PEFT LoRA adapter folder (or fixture name), for engines that take LoRA adapters (`crossengine engines`).")
    chat_template: str | None = Field(None, description="A Jinja chat template file (relative to the experiment) used instead of the model's, for `messages` samples.")
    inputs: Literal["reference", "own"] = Field(
        "reference",
        description="reference: score the reference's prepared samples (token ids, pixels); own: this engine renders, "
        "tokenises and processes each sample itself, its inputs are compared with the reference's (inputs/), then it scores its own "
        "where the token ids agree and the reference's where they do not.",
    )

    refit: RefitSpec | None = Field(
        None, description="Push other weights into this engine in place and score after each push, against fresh loads of them (engines that refit: `crossengine engines`)."
    )

    expect: Literal["bitwise"] | None = Field(
        None, description="bitwise: this engine claims bitwise-identical scores under every noise condition (`noise:`); the run checks it and fails naming the first token that differs."
    )
    negative_control: bool | dict[str, Any] = Field(
        False,
        description="With expect: also run this engine without the claimed setting, as candidate NAME.control, and say when it "
        "shows no difference either (a check that cannot fail). true: without env.env_vars (e.g. VLLM_BATCH_INVARIANT=1); "
        "a mapping: these field overrides turn the setting off (e.g. {batching: padded}).",
    )

    @model_validator(mode="after")
    def _control_needs_claim(self) -> EngineSpec:
        if self.negative_control is not False and self.expect is None:
            raise ValueError("negative_control goes with expect: bitwise (it checks that the claim's check can fail)")
        if self.negative_control is True and not (self.env and self.env.env_vars):
            raise ValueError(
                "negative_control: true runs the engine without its env.env_vars, and this engine sets none; "
                "give the fields that turn the claimed setting off instead, e.g. negative_control: {batching: padded}"
            )
        if isinstance(self.negative_control, dict) and {"type", "expect", "negative_control"} & set(self.negative_control):
            raise ValueError("negative_control overrides the engine's own fields (not type, expect or negative_control)")
        return self

    def control_fields(self) -> dict[str, Any]:
        """The fields of this engine's negative control: its own, without the claim and the claimed setting."""
        fields = self.model_dump(exclude_unset=True, exclude={"expect", "negative_control"})
        if self.negative_control is True:
            fields["env"] = {**fields.get("env", {}), "env_vars": {}}
        elif isinstance(self.negative_control, dict):
            fields.update(self.negative_control)
        return fields

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v

    def user_code(self) -> list[tuple[tuple, str]]:
        """(field location, 'module:function') of every piece of user code this spec names: preflight
        imports each where the workers will, so a typo is a file:line error before anything loads."""
        return [(("refit", "update"), self.refit.update)] if self.refit and self.refit.update else []

    @property
    def replays_reference_routing(self) -> bool:
        """Whether this engine routes with the reference's expert choices (torch engines' `routing: replay`): its
        worker then waits for the reference's scores before its own forward instead of after."""
        return False

    def named_paths(self) -> list[tuple[tuple, str]]:
        """(field location, path) of every file this spec reads besides the model: the plan resolves
        each against the experiment's folder, checks it exists, and fingerprints it for resume."""
        return []

    @property
    def input_pipeline(self) -> str | None:
        """The user code that prepares this engine's inputs (a native `preprocess`), or None for the
        checkpoint's own tokenizer/processor. Such code names image inputs its own way, which other
        engines cannot read: image candidates of such a reference must prepare their own inputs."""
        return None
