"""The experiment file's schema: typed sections, a docstring per field, nothing read from disk.

Reading YAML, line numbers and file checks are in load.py; an engine's own fields are its
adapter's `Spec` (crossengine/adapters/spec.py), found through the registry by `type`, so
this module never names an engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from crossengine.adapters import (
    BUILTIN,
    UnknownEngine,
    engine_class,
    registered,
    spec_model,
)
from crossengine.adapters.spec import Dtype, EngineSpec, EnvSpec, Strict
from crossengine.compare.noise import CONDITIONS
from crossengine.experiment.gates import GateSpec
from crossengine.identity import BASE
from crossengine.identity import RESERVED as RESERVED_NAMES

__all__ = ["Dtype", "EngineSpec", "EnvSpec", "Experiment", "LocalizeSpec", "NoiseSpec", "PlacementSpec", "SampleSpec", "SamplingSpec", "VariantSpec", "NAME"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONTROL_SUFFIX = ".control"  # an engine's negative control runs as the candidate NAME.control


def _field_error(loc: tuple, message: str, value: Any) -> ValidationError:
    """A ValidationError at `loc` inside the value being validated (pydantic prefixes the outer location)."""
    detail = InitErrorDetails(type=PydanticCustomError("engine_field", message), loc=loc, input=value)
    return ValidationError.from_exception_data("EngineSpec", [detail])


def engine_spec(value: Any) -> Any:
    """One `engines.NAME` mapping validated by the model its `type` registers: the registry, not this module, knows engines."""

    if not isinstance(value, dict):
        return value  # an EngineSpec already, or pydantic's own type error
    kind = value.get("type")
    if not isinstance(kind, str):
        raise _field_error(("type",), "required field is missing" if kind is None else "must be a string", kind)
    try:
        model = spec_model(kind)
    except UnknownEngine as exc:
        raise _field_error(("type",), str(exc), kind) from None
    for key in value:
        if key not in model.model_fields:
            raise _field_error((key,), not_a_field(key, kind, model), value[key])
    spec = model.model_validate(value)
    if spec.lora and not engine_class(kind).traits.lora:
        raise _field_error(("lora",), f"{kind} engines take no LoRA adapter", spec.lora)
    if spec.refit and not engine_class(kind).traits.refits:
        raise _field_error(("refit",), f"{kind} engines cannot take new weights in place (engines that can: `crossengine engines`, trait refits)", value.get("refit"))
    return spec


def not_a_field(key: str, kind: str, model) -> str:
    """'x' is not a field of hf engines (native engines take it): names the engines that do, where a built-in one does."""

    takers = [k for k in sorted(BUILTIN) if k != kind and key in spec_model(k).model_fields]
    where = f" ({', '.join(takers)} engines take it)" if takers else ""
    return f"unknown key {key!r}: not a field of {kind} engines{where}; `crossengine schema` lists each engine's fields"


AnyEngineSpec = Annotated[SerializeAsAny[EngineSpec], BeforeValidator(engine_spec)]


class VariantSpec(Strict):
    """A variant names its base engine and overrides any of that engine's fields (checked against its type by load.py)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    engine: str = Field(description="The engine this variant starts from.")

    @model_validator(mode="after")
    def _no_type(self) -> VariantSpec:
        if "type" in self.overrides():
            raise ValueError("a variant has its engine's type; make another engine for another type")
        return self

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MessagePart(Strict):
    """One piece of a chat message: text, or an image file (where the chat template puts its placeholder)."""

    type: Literal["text", "image"]
    text: str | None = None
    path: Path | None = Field(None, description="image: the file, relative to the experiment (or JSONL) file.")

    @model_validator(mode="after")
    def _fields(self) -> MessagePart:
        if self.type == "text" and (self.text is None or self.path is not None):
            raise ValueError("a text part has `text` and no `path`")
        if self.type == "image" and (self.path is None or self.text is not None):
            raise ValueError("an image part has `path` (the image file) and no `text`")
        return self


class Message(Strict):
    """One chat turn, rendered by each engine's chat template."""

    role: Literal["system", "user", "assistant"]
    content: list[MessagePart] | str


class SampleSpec(Strict):
    """A prompt: text (optionally with images), chat messages, raw token ids, or a JSONL file of these."""

    id: str | None = Field(None, description="Stable id; default: s<index>.")
    text: str | None = None
    images: list[Path] = Field(default_factory=list, description="Image files; the text marks where each goes.")
    token_ids: list[int] | None = None
    prompt_len: int | None = Field(None, ge=1, description="With token_ids: where the response starts (its tokens are the completion segment).")
    messages: list[Message] | None = Field(None, description="Chat turns, rendered with the engine's chat template.")
    file: Path | None = Field(None, description="JSONL file, one sample object per line.")
    dump: str | None = Field(None, description="Every record of this engine's dump (a logprobs engine), in file order, as token_ids samples.")
    _record: Any = PrivateAttr(None)  # where a dump sample's record is (its engine's `records().index()` pointer); the driver reads it per batch

    @model_validator(mode="after")
    def _one_source(self) -> SampleSpec:
        given = [k for k in ("text", "token_ids", "messages", "file", "dump") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, messages, token_ids, file or dump")
        if self.prompt_len is not None and (self.token_ids is None or self.prompt_len >= len(self.token_ids)):
            raise ValueError("prompt_len goes with token_ids and must be below their length")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if self.images and self.text is None:
            raise ValueError("images need a text prompt")
        if self.token_ids is not None:
            if len(self.token_ids) < 2:
                raise ValueError("token_ids needs at least 2 tokens (position 0 is never scored)")
            if min(self.token_ids) < 0:
                raise ValueError("token ids must be >= 0")
        if self.text is not None and not self.text:
            raise ValueError("text is empty")
        return self


class SamplingSpec(Strict):
    """Generation mode: how the generator samples completions."""

    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1: no top-k truncation.")
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, description="Completions per prompt.")
    seed: int | None = None
    logprobs: Literal["raw", "processed"] = Field(
        "raw",
        description="The quantity every engine reports: raw (log_softmax of the logits, vLLM's default raw_logprobs) or processed "
        "(after temperature and top-k/top-p, renormalised: vLLM's processed_logprobs, passed to a vLLM generator as logprobs_mode).",
    )

    def reading(self):
        """The processed quantity this sampling makes, or None where the log-probs are raw (or greedy)."""
        return {"temperature": self.temperature, "top_k": max(self.top_k, 0), "top_p": self.top_p} if self.logprobs == "processed" and self.temperature > 0 else None


class LocalizeSpec(Strict):
    """Where do two engines part ways? Module outputs compared layer by layer (hf, native)."""

    samples: int = Field(1, ge=1, description="How many samples (the first N) to trace.")
    tolerance: float = Field(1e-4, ge=0, description="A module diverges where max |Δ output| exceeds this.")
    modules: list[str] | None = Field(None, description="Regexes of module names to capture; default: every module whose forward returns a tensor.")
    max_positions: int = Field(512, ge=1, description="Positions kept per module output (memory bound); the output says when a sample was longer.")
    module_map: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="engine -> {its module name: the reference's}; overrides the automatic alignment (forward order, shape, values; HF<->OLMo-core names built in)."
    )
    audit_buffers: bool = Field(True, description="Also audit every registered buffer against a fresh construction.")


class NoiseSpec(Strict):
    """Each engine's own noise floor: its batch scored again under conditions it really runs in (crossengine/compare/noise.py).

    Costs one more scoring of the batch per condition (`alone` one call per sample): say 1 + conditions × the scoring time."""

    conditions: list[str] = Field(
        default_factory=lambda: ["alone", "shuffled", "repeat"],
        description="Which conditions to vary: alone (batch size 1), shuffled (a random place among at least `fillers` other prompts), "
        "repeat (the same call again), and for engines with batching (hf, native) single, padded, padded-left, packed.",
    )
    repeats: int = Field(1, ge=1, le=100, description="How many times `repeat` runs the same call again.")
    fillers: int = Field(7, ge=0, le=4096, description="shuffled and the batchings: other prompts in the call (copies of the batch's samples where it has fewer).")
    seed: int = Field(0, description="Seeds where each sample goes among the fillers.")
    margin: float = Field(1.0, gt=0, description="above_noise: |lp_diff| > margin × the larger of the two engines' floors at that token.")
    rounding_ulps: float = Field(
        8.0,
        ge=0,
        description="above_noise also needs |lp_diff| > rounding_ulps × eps × max(|lp_ref|, |lp_cand|, 1), eps the machine epsilon of the coarser "
        "of the two engines' dtypes (float32 2^-23, float16 2^-10, bfloat16 2^-7): two engines' kernels (attention, matmuls, the "
        "vocabulary's sum) round differently even where each engine is bitwise stable (HF fp32 vs vLLM fp32 on tiny-text-32k: up to 4.6 "
        "of these units). 0 turns it off.",
    )
    engines: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Conditions for one engine or variant instead of `conditions` ([] gives it no floor); engines not named use `conditions`.",
    )

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:

        for c in v:
            if c not in CONDITIONS:
                raise ValueError(f"unknown condition {c!r}; conditions: {', '.join(CONDITIONS)}")
        if len(set(v)) != len(v):
            raise ValueError("a condition is named twice")
        return v

    @field_validator("engines")
    @classmethod
    def _known_each(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for conditions in v.values():
            cls._known(conditions)
        return v


class PlacementSpec(Strict):
    """How engines are put on GPUs; decided before any engine loads (crossengine/run/placement.py)."""

    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory of one GPU, where Ray cannot tell (it never can for advertised GPUs); default: nvidia-smi on a cluster node, else unknown.")
    headroom_gb: float = Field(2.0, ge=0, description="Per-engine room beyond the weights: CUDA context, activations, logits.")
    vllm_kv_cache_gb: float = Field(4.0, ge=0, description="Extra room a vLLM engine gets for its KV cache.")
    timeout_s: float = Field(120.0, gt=0, description="How long an engine may wait for the cluster to place it before the run stops with an error.")
    env_timeout_s: float = Field(1800.0, gt=0, description="The same for an engine whose own environment is built first (pip/python).")
    load_timeout_s: float = Field(3600.0, gt=0, description="How long an engine may take to load its model once placed.")
    logits_transport: Literal["auto", "object_store", "gloo", "nccl"] = Field(
        "auto",
        description="How the reference's full logits reach candidate workers: object_store (host arrays through Ray's object store), "
        "gloo or nccl (torch tensors worker to worker, Ray Direct Transport); auto: nccl between torch engines on GPUs, else object_store. "
        "A candidate that cannot take tensors (its own environment, vLLM, a dump, a routing replay) keeps the object store.",
    )
    logits_budget_gb: float | None = Field(
        None,
        gt=0,
        description="Most full-vocabulary logits one worker holds at once (GiB): a sample whose logits exceed it is scored and "
        "compared a block of positions at a time (engines with the chunks_logits trait: hf, vllm). Default: whole samples.",
    )

    @property
    def logits_budget_bytes(self) -> int | None:
        return None if self.logits_budget_gb is None else int(self.logits_budget_gb * 2**30)


class Experiment(Strict):
    """An experiment: one model, a reference engine, candidates, variants and samples."""

    name: str | None = Field(None, description="Default: the file's stem.")
    model: str = Field(description="Fixture name (tiny-text, tiny-vision), local path or hub id.")
    reference: str = Field(description="Name of the engine every other one is compared against.")
    engines: dict[str, AnyEngineSpec] = Field(min_length=1)
    variants: dict[str, VariantSpec] = Field(default_factory=dict)
    samples: list[SampleSpec] = Field(min_length=1)
    mode: Literal["score", "generate", "greedy"] = Field(
        "score",
        description="score: teacher-forced prompts; generate: the generator samples, every engine rescores; "
        "greedy: every engine decodes greedily, first divergence per sample reported, the reference's decode rescored.",
    )
    generator: str | None = Field(None, description="generate mode: the sampling engine; default: the reference.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    top_k: int = Field(20, ge=1, le=1000, description="Top-k ids and log-probs kept per position.")
    full_vocab: bool = Field(True, description="Use full-vocabulary logits where an engine gives them (KL, cos_sim).")
    tie_eps: float = Field(1e-3, ge=0, description="A top-1 mismatch where the reference's two best differ by less is a tie.")
    dtype: Dtype = "float32"
    device: str = "auto"
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=4096)
    max_length: int | None = Field(None, ge=2, description="Truncate prompts to this many tokens.")
    output_dir: Path = Path("results")
    run_id: str | None = None
    localize: LocalizeSpec | None = Field(None, description="Also localise divergence layer by layer after the run (or: crossengine localize).")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="GPU memory, headroom and timeouts for putting engines on the cluster.")
    routing: bool = Field(
        False,
        description="Record each MoE layer's expert choice on every engine (routing/ parts, routing_flips, docs/guides/moe-routing.md); "
        "an engine that cannot report routing, or a dense model, is a one-line error before anything loads.",
    )
    noise: NoiseSpec | None = Field(
        None, description="Measure each engine's own noise floor (docs/guides/noise-floor.md): noise/ parts, noise_* and above_noise token columns, frac_above_noise; `noise: true` takes the defaults."
    )
    gates: list[GateSpec] = Field(
        default_factory=list, description="Checks the run must pass, for CI: a summary metric's bounds or an alarm that must not trip; a broken gate exits 3 (crossengine/experiment/gates.py)."
    )
    alarms: dict[str, float | list[float] | None] = Field(
        default_factory=dict,
        description="Change an alarm's limit by name (a number, [low, high] for a band) or switch it off (null); the alarms and their published defaults are in docs/guides/rl-monitor.md#alarms.",
    )

    @field_validator("alarms")
    @classmethod
    def _alarm_names(cls, v: dict) -> dict:
        from crossengine.compare.alarms import rules

        rules(v)  # an unknown name or a limit of the wrong shape: one line
        return v

    @field_validator("noise", mode="before")
    @classmethod
    def _noise_flag(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    @field_validator("localize", mode="before")
    @classmethod
    def _localize_flag(cls, v: Any) -> Any:
        return {} if v is True else (None if v is False else v)

    @field_validator("engines", "variants")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not NAME.match(name):
                raise ValueError(f"name {name!r} must match {NAME.pattern}")
            if name in RESERVED_NAMES:  # the token table's `variant` column uses them for engines themselves
                raise ValueError(f"name {name!r} is reserved ({', '.join(RESERVED_NAMES)}); choose another")
        return v

    @field_validator("run_id", "name")
    @classmethod
    def _folder_name(cls, v: str | None, info) -> str | None:
        # both become a folder name under output_dir: nothing may climb out of it
        if v is not None and not NAME.match(v):
            raise ValueError(f"{info.field_name} {v!r} must match {NAME.pattern} (it names the results folder)")
        return v

    def resolved_engines(self) -> dict[str, tuple[str, str, EngineSpec]]:
        """name -> (cand_engine, variant, full spec); a variant is its base engine's fields with its overrides,
        validated by the base engine's own model (load.py turns a bad override into a file:line error)."""
        out: dict[str, tuple[str, str, EngineSpec]] = {}
        for name, spec in self.engines.items():
            out[name] = (name, BASE, self._fill(spec))
        for name, var in self.variants.items():
            out[name] = (var.engine, name, self._fill(type(self.engines[var.engine]).model_validate(self.variant_fields(name))))
        return out

    def noise_conditions(self, name: str) -> list[str]:
        """The noise conditions of engine or variant `name` (a negative control has its engine's); [] without `noise:`."""
        if self.noise is None:
            return []
        base = name.removesuffix(CONTROL_SUFFIX)
        return self.noise.engines.get(name, self.noise.engines.get(base, self.noise.conditions))

    def variant_fields(self, name: str) -> dict[str, Any]:
        """A variant's fields: its base engine's as given, with the variant's overrides."""
        var = self.variants[name]
        return {**self.engines[var.engine].model_dump(exclude_unset=True), **var.overrides()}

    def _fill(self, spec: EngineSpec) -> EngineSpec:
        return spec.model_copy(
            update={
                "model": spec.model or self.model,
                "dtype": spec.dtype or self.dtype,
                "device": spec.device or self.device,
            }
        )


def json_schema() -> dict[str, Any]:
    """JSON Schema of the experiment file, for editors (`crossengine schema`): each registered engine's
    own fields, chosen by `type` (an engine that does not import here is left out)."""

    schema = Experiment.model_json_schema()
    defs = schema.setdefault("$defs", {})
    options = []
    for kind in sorted(registered()):
        try:
            sub = spec_model(kind).model_json_schema(ref_template="#/$defs/{model}")
        except UnknownEngine:
            continue
        defs.update(sub.pop("$defs", {}))
        sub["properties"]["type"] = {"const": kind, "description": sub["properties"]["type"].get("description", "")}
        title = f"{kind}EngineSpec"
        defs[title] = {**sub, "title": title}
        options.append({"$ref": f"#/$defs/{title}"})
    schema["properties"]["engines"]["additionalProperties"] = {"oneOf": options, "discriminator": {"propertyName": "type"}}
    return schema
