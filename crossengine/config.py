"""The experiment file: typed, validated at load, every error one line naming file:line: field.

Validation happens entirely before a results directory exists, so a bad experiment never
leaves anything behind. YAML is read with `yaml.safe_load` (after a duplicate-key
check, since silently keeping the last of two engines with one name hides mistakes);
nothing in it is evaluated, and user code loads only from an explicit "module:function".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import ExperimentError
from .identity import BASE

Dtype = Literal["float32", "bfloat16", "float16"]
EngineType = Literal["hf", "vllm", "native"]
_CALLABLE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
from .identity import RESERVED as RESERVED_NAMES  # noqa: E402 - the token table's variant values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvSpec(_Strict):
    """Where an engine's worker runs: its own pip environment or an existing interpreter."""

    pip: Optional[list[str]] = Field(None, description="Packages for a Ray runtime_env, e.g. ['transformers==4.57.6'].")
    python: Optional[str] = Field(None, description="Path to another environment's python (Ray py_executable).")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables for the worker.")

    @model_validator(mode="after")
    def _one_kind(self) -> "EnvSpec":
        if self.pip and self.python:
            raise ValueError("give either pip or python, not both")
        return self


class EngineSpec(_Strict):
    """One engine instance. Fields left out inherit the experiment's model, dtype and device."""

    type: EngineType = Field(description="Which adapter runs it: hf, vllm or native.")
    model: Optional[str] = Field(None, description="Fixture name, local path or hub id; default: the experiment's model.")
    dtype: Optional[Dtype] = Field(None, description="Weights and compute dtype; default: the experiment's.")
    device: Optional[str] = Field(None, description="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    attn_implementation: Optional[str] = Field(None, description="HF attention backend: eager, sdpa, flash_attention_2 ...")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run the model repo's own Python code. Off unless set.")
    drop_inputs: list[str] = Field(default_factory=list, description="Model inputs to withhold, e.g. token_type_ids.")
    patches: list[str] = Field(default_factory=list, description="Built-in patch names or 'module:function' refs.")
    factory: Optional[str] = Field(None, description="native: 'module:function' returning the model.")
    preprocess: Optional[str] = Field(None, description="native: 'module:function' turning a sample into model inputs.")
    chat_format: Optional[str] = Field(
        None, description="native: 'module:function' rendering `messages` (list of {role, content}) to the prompt text, as the training code does."
    )
    env: Optional[EnvSpec] = Field(None, description="Run this engine in its own Python environment.")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs for this engine's worker; default 1 on a GPU cluster, else 0.")
    options: dict[str, Any] = Field(default_factory=dict, description="Engine-specific keyword arguments (e.g. vllm.LLM's).")
    lora: Optional[str] = Field(
        None, description="A PEFT LoRA adapter folder (or fixture name): hf loads it with PEFT, unmerged; vllm with enable_lora and a "
        "LoRARequest per request; native passes it to the factory as lora=PATH."
    )
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template file (relative to the experiment) used instead of the model's, for `messages` samples."
    )
    lora_merge: bool = Field(False, description="hf: merge the adapter into the weights before scoring (PEFT merge_and_unload).")
    inputs: Literal["reference", "own"] = Field(
        "reference", description="reference: score the reference's prepared samples (token ids, pixels); own: this engine renders, "
        "tokenises and processes each sample itself, its inputs are compared with the reference's (inputs/), then it scores its own "
        "where the token ids agree and the reference's where they do not."
    )
    full_vocab: bool = Field(
        False, description="vllm: return the whole distribution at every position (prompt_logprobs=-1): exact full-vocabulary KL and rank "
        "instead of top-k, at the cost of V log-probs per position through vLLM's output. hf and native always give full logits."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("factory", "preprocess", "chat_format")
    @classmethod
    def _callable_ref(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _CALLABLE_REF.match(v):
            raise ValueError(f"{v!r} is not of the form 'package.module:function'")
        return v

    @field_validator("patches")
    @classmethod
    def _patch_names(cls, v: list[str]) -> list[str]:
        from .adapters.patches import BUILTIN

        for ref in v:
            if ref not in BUILTIN and not _CALLABLE_REF.match(ref):
                raise ValueError(f"unknown patch {ref!r}; built-in patches: {', '.join(sorted(BUILTIN))}, or 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _fits_type(self) -> "EngineSpec":
        if self.type != "native" and (self.factory or self.preprocess or self.chat_format):
            raise ValueError(f"factory/preprocess/chat_format are for native engines, not {self.type}")
        if self.chat_format and self.chat_template:
            raise ValueError("give chat_format (native code) or chat_template (a Jinja file), not both")
        if self.type == "vllm" and self.attn_implementation:
            raise ValueError("attn_implementation is an hf option; vLLM picks its backend via options")
        if self.lora_merge and not self.lora:
            raise ValueError("lora_merge needs a lora adapter")
        if self.type == "native":
            from .adapters.patches import BUILTIN

            builtin = [p for p in self.patches if p in BUILTIN]
            if builtin:
                raise ValueError(f"built-in patches ({', '.join(builtin)}) change a transformers model; a native engine takes 'module:function' patches")
        if self.full_vocab and self.type != "vllm":
            raise ValueError(f"full_vocab is a vllm option: {self.type} engines always give full logits (the experiment's full_vocab decides their use)")
        if self.lora_merge and self.type != "hf":
            raise ValueError(f"lora_merge is an hf option (PEFT's merge); a {self.type} engine gets the adapter as it is")
        return self


# A variant names its base engine and overrides any of the engine's fields.
VariantSpec = create_model(
    "VariantSpec",
    __config__=ConfigDict(extra="forbid", frozen=True),
    engine=(str, Field(description="The engine this variant starts from.")),
    **{name: (Optional[f.annotation], None) for name, f in EngineSpec.model_fields.items() if name != "type"},
)


class MessagePart(_Strict):
    """One piece of a chat message: text, or an image file (where the chat template puts its placeholder)."""

    type: Literal["text", "image"]
    text: Optional[str] = None
    path: Optional[Path] = Field(None, description="image: the file, relative to the experiment (or JSONL) file.")

    @model_validator(mode="after")
    def _fields(self) -> "MessagePart":
        if self.type == "text" and (self.text is None or self.path is not None):
            raise ValueError("a text part has `text` and no `path`")
        if self.type == "image" and (self.path is None or self.text is not None):
            raise ValueError("an image part has `path` (the image file) and no `text`")
        return self


class Message(_Strict):
    """One chat turn, rendered by each engine's chat template."""

    role: Literal["system", "user", "assistant"]
    content: list[MessagePart] | str


class SampleSpec(_Strict):
    """A prompt: text (optionally with images), chat messages, raw token ids, or a JSONL file of these."""

    id: Optional[str] = Field(None, description="Stable id; default: s<index>.")
    text: Optional[str] = None
    images: list[Path] = Field(default_factory=list, description="Image files; the text marks where each goes.")
    token_ids: Optional[list[int]] = None
    messages: Optional[list[Message]] = Field(None, description="Chat turns, rendered with the engine's chat template.")
    file: Optional[Path] = Field(None, description="JSONL file, one sample object per line.")

    @model_validator(mode="after")
    def _one_source(self) -> "SampleSpec":
        given = [k for k in ("text", "token_ids", "messages", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, messages, token_ids or file")
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


class SamplingSpec(_Strict):
    """Generation mode: how the generator samples completions."""

    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1: no top-k truncation.")
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, description="Completions per prompt.")
    seed: Optional[int] = None


class LocalizeSpec(_Strict):
    """Where do two engines part ways? Module outputs compared layer by layer (hf, native)."""

    samples: int = Field(1, ge=1, description="How many samples (the first N) to trace.")
    tolerance: float = Field(1e-4, ge=0, description="A module diverges where max |Δ output| exceeds this.")
    modules: Optional[list[str]] = Field(None, description="Regexes of module names to capture; default: every module whose forward returns a tensor.")
    max_positions: int = Field(512, ge=1, description="Positions kept per module output (memory bound); the output says when a sample was longer.")
    module_map: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="engine -> {its module name: the reference's}; overrides the automatic alignment (forward order, shape, values; HF<->OLMo-core names built in)."
    )
    audit_buffers: bool = Field(True, description="Also audit every registered buffer against a fresh construction.")


class PlacementSpec(_Strict):
    """How engines are put on GPUs; decided before any engine loads (crossengine/placement.py)."""

    gpu_memory_gb: Optional[float] = Field(
        None, gt=0, description="Memory of one GPU, where Ray cannot tell (it never can for advertised GPUs); default: nvidia-smi on a cluster node, else unknown."
    )
    headroom_gb: float = Field(2.0, ge=0, description="Per-engine room beyond the weights: CUDA context, activations, logits.")
    vllm_kv_cache_gb: float = Field(4.0, ge=0, description="Extra room a vLLM engine gets for its KV cache.")
    timeout_s: float = Field(120.0, gt=0, description="How long an engine may wait for the cluster to place it before the run stops with an error.")
    env_timeout_s: float = Field(1800.0, gt=0, description="The same for an engine whose own environment is built first (pip/python).")
    load_timeout_s: float = Field(3600.0, gt=0, description="How long an engine may take to load its model once placed.")


class Experiment(_Strict):
    """An experiment: one model, a reference engine, candidates, variants and samples."""

    name: Optional[str] = Field(None, description="Default: the file's stem.")
    model: str = Field(description="Fixture name (tiny-text, tiny-vision), local path or hub id.")
    reference: str = Field(description="Name of the engine every other one is compared against.")
    engines: dict[str, EngineSpec] = Field(min_length=1)
    variants: dict[str, VariantSpec] = Field(default_factory=dict)  # type: ignore[valid-type]
    samples: list[SampleSpec] = Field(min_length=1)
    mode: Literal["score", "generate", "greedy"] = Field(
        "score",
        description="score: teacher-forced prompts; generate: the generator samples, every engine rescores; "
        "greedy: every engine decodes greedily, first divergence per sample reported, the reference's decode rescored.",
    )
    generator: Optional[str] = Field(None, description="generate mode: the sampling engine; default: the reference.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    top_k: int = Field(20, ge=1, le=1000, description="Top-k ids and log-probs kept per position.")
    full_vocab: bool = Field(True, description="Use full-vocabulary logits where an engine gives them (KL, cos_sim).")
    tie_eps: float = Field(1e-3, ge=0, description="A top-1 mismatch where the reference's two best differ by less is a tie.")
    dtype: Dtype = "float32"
    device: str = "auto"
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=4096)
    max_length: Optional[int] = Field(None, ge=2, description="Truncate prompts to this many tokens.")
    output_dir: Path = Path("results")
    run_id: Optional[str] = None
    localize: Optional[LocalizeSpec] = Field(None, description="Also localise divergence layer by layer after the run (or: crossengine localize).")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="GPU memory, headroom and timeouts for putting engines on the cluster.")

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
    def _folder_name(cls, v: Optional[str], info) -> Optional[str]:
        # both become a folder name under output_dir: nothing may climb out of it
        if v is not None and not NAME.match(v):
            raise ValueError(f"{info.field_name} {v!r} must match {NAME.pattern} (it names the results folder)")
        return v

    def resolved_engines(self) -> dict[str, tuple[str, str, EngineSpec]]:
        """name -> (cand_engine, variant, full spec); variants are their base engine with overrides."""
        out: dict[str, tuple[str, str, EngineSpec]] = {}
        for name, spec in self.engines.items():
            out[name] = (name, BASE, self._fill(spec))
        for name, var in self.variants.items():
            base = self.engines[var.engine].model_dump(exclude_unset=True)
            base.update(var.model_dump(exclude_unset=True, exclude={"engine"}))
            out[name] = (var.engine, name, self._fill(EngineSpec.model_validate(base)))
        return out

    def _fill(self, spec: EngineSpec) -> EngineSpec:
        return spec.model_copy(
            update={
                "model": spec.model or self.model,
                "dtype": spec.dtype or self.dtype,
                "device": spec.device or self.device,
            }
        )


# --------------------------------------------------------------------------- loading


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the deepest YAML node the pydantic location reaches."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(part):
                    nxt, line = v, k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _first_error(exc: ValidationError, path: Path, root: yaml.Node | None, prefix: tuple = ()) -> ExperimentError:
    err = exc.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {loc[-1]!r}"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return ExperimentError(str(path), _line_of(root, loc), _field_path(loc), msg)


def _check_references(exp: Experiment, path: Path, root: yaml.Node | None) -> None:
    """Names that must point at engines; checked after typing so each error names its field."""

    def fail(loc: tuple, msg: str) -> None:
        raise ExperimentError(str(path), _line_of(root, loc), _field_path(loc), msg)

    engines = sorted(exp.engines)
    if exp.reference not in exp.engines:
        fail(("reference",), f"{exp.reference!r} is not one of the engines {engines}")
    for name, var in exp.variants.items():
        if var.engine not in exp.engines:
            fail(("variants", name, "engine"), f"{var.engine!r} is not one of the engines {engines}")
        if name in exp.engines:
            fail(("variants", name), f"variant {name!r} has the name of an engine")
    if exp.generator is not None and exp.generator not in exp.engines:
        fail(("generator",), f"{exp.generator!r} is not one of the engines {engines}")
    ref_spec = exp.resolved_engines()[exp.reference][2]
    if ref_spec.inputs == "own":
        fail(("engines", exp.reference, "inputs"), "the reference always prepares the inputs; `inputs: own` is for candidates")
    if exp.mode != "score" and any(spec.inputs == "own" for _, _, spec in exp.resolved_engines().values()):
        fail(("mode",), "`inputs: own` compares prompts before scoring them: mode score only (generate/greedy score the reference's prompts)")
    if len(exp.engines) + len(exp.variants) < 2:
        fail(("engines",), "need a reference and at least one candidate engine or variant")


def _duplicate_key(node: yaml.Node | None, loc: tuple = ()) -> tuple[tuple, int] | None:
    """The path and line of the first key given twice in one mapping (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if k.value in seen:
                return loc + (k.value,), k.start_mark.line + 1
            seen.add(k.value)
            found = _duplicate_key(v, loc + (k.value,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = _duplicate_key(v, loc + (i,))
            if found:
                return found
    return None


def _check_paths(exp: Experiment, path: Path, root: yaml.Node | None) -> Experiment:
    """Resolve image and JSONL paths against the experiment's folder and check they exist."""
    base = path.parent
    samples: list[SampleSpec] = []
    for i, s in enumerate(exp.samples):
        if s.file is not None:
            f = s.file if s.file.is_absolute() else base / s.file
            if not f.is_file():
                raise ExperimentError(str(path), _line_of(root, ("samples", i, "file")), f"samples[{i}].file", f"no such file: {f}")
            samples.extend(_read_jsonl(f, i))
            continue
        images = []
        for j, img in enumerate(s.images):
            p = img if img.is_absolute() else base / img
            if not p.is_file():
                loc = ("samples", i, "images", j)
                raise ExperimentError(str(path), _line_of(root, loc), _field_path(loc), f"no such image file: {p}")
            images.append(p.resolve())
        s = _message_images(s, base, lambda loc, msg: ExperimentError(str(path), _line_of(root, ("samples", i, *loc)), _field_path(("samples", i, *loc)), msg))
        samples.append(s.model_copy(update={"images": images}))
    return exp.model_copy(update={"samples": _with_ids(samples, path, root)})


def _message_images(s: SampleSpec, base: Path, error) -> SampleSpec:
    """Image parts of chat messages resolved against `base` and checked, like `images`."""
    if not s.messages:
        return s
    messages = []
    for m, msg in enumerate(s.messages):
        if isinstance(msg.content, list):
            parts = []
            for k, part in enumerate(msg.content):
                if part.type == "image":
                    p = part.path if part.path.is_absolute() else base / part.path
                    if not p.is_file():
                        raise error(("messages", m, "content", k, "path"), f"no such image file: {p}")
                    part = part.model_copy(update={"path": p.resolve()})
                parts.append(part)
            msg = msg.model_copy(update={"content": parts})
        messages.append(msg)
    return s.model_copy(update={"messages": messages})


def _with_ids(samples: list[SampleSpec], path: Path, root: yaml.Node | None) -> list[SampleSpec]:
    """Every sample gets an id: explicit ones must be unique; `s<index>` for the rest never
    takes an explicit id (two samples under one id would merge their rows silently)."""
    explicit: set[str] = set()
    for s in samples:
        if s.id is not None:
            if s.id in explicit:
                raise ExperimentError(str(path), _line_of(root, ("samples",)), "samples", f"duplicate sample id {s.id!r}")
            explicit.add(s.id)
    out = []
    for i, s in enumerate(samples):
        if s.id is None:
            auto, n = f"s{i}", 1
            while auto in explicit:
                auto, n = f"s{i}-{n}", n + 1
            s = s.model_copy(update={"id": auto})
        out.append(s)
    return out


def _read_jsonl(f: Path, index: int) -> list[SampleSpec]:
    out = []
    for n, line in enumerate(f.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            spec = SampleSpec.model_validate(obj)
        except json.JSONDecodeError as e:
            raise ExperimentError(str(f), n, f"samples[{index}].file", f"invalid JSON: {e.msg}") from None
        except ValidationError as e:
            err = _first_error(e, f, None)
            raise ExperimentError(str(f), n, err.field, err.message) from None
        if spec.file is not None:
            raise ExperimentError(str(f), n, "file", "a JSONL sample cannot name another file")
        images = [p if p.is_absolute() else (f.parent / p) for p in spec.images]
        for p in images:
            if not p.is_file():
                raise ExperimentError(str(f), n, "images", f"no such image file: {p}")
        spec = _message_images(spec, f.parent, lambda loc, msg: ExperimentError(str(f), n, _field_path(loc), msg))
        out.append(spec.model_copy(update={"images": [p.resolve() for p in images]}))
    if not out:
        raise ExperimentError(str(f), None, f"samples[{index}].file", "the file holds no samples")
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Read, validate and resolve an experiment file; raises ExperimentError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(str(path), None, "<file>", "no such experiment file")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicate = _duplicate_key(root)
        if duplicate:
            loc, line = duplicate
            raise ExperimentError(str(path), line, _field_path(loc), f"duplicate key {loc[-1]!r} (YAML would silently keep the last)")
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = (e.problem or str(e)).strip()
        raise ExperimentError(str(path), line, "<yaml>", f"YAML error: {problem}") from None
    if not isinstance(data, dict):
        raise ExperimentError(str(path), 1, "<top>", "an experiment is a YAML mapping of fields")
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "experiment")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, path, root) from None
    _check_references(exp, path, root)
    exp = _check_paths(exp, path, root)
    _check_native_inputs(exp, path, root)
    return exp


def _check_native_inputs(exp: Experiment, path: Path, root: yaml.Node | None) -> None:
    """A native reference with its own `preprocess` names image inputs its own way (Molmo's
    `images`, `image_input_idx`): another engine given them would run without images, since
    models ignore inputs they do not know. Such candidates must prepare their own inputs."""
    ref_spec = exp.resolved_engines()[exp.reference][2]
    has_images = any(s.images or any(isinstance(m.content, list) and any(p.type == "image" for p in m.content) for m in s.messages or [])
                     for s in exp.samples)
    if ref_spec.type != "native" or not ref_spec.preprocess or not has_images:
        return
    for name, (_, variant, spec) in exp.resolved_engines().items():
        if name != exp.reference and spec.inputs == "reference" and spec.preprocess != ref_spec.preprocess:
            loc = ("engines", name) if variant == BASE else ("variants", name)
            raise ExperimentError(str(path), _line_of(root, loc), _field_path(loc), f"the reference {exp.reference!r} prepares images with its own "
                                  f"preprocess ({ref_spec.preprocess}), whose inputs this engine cannot read: give it `inputs: own`")


def experiment_error(path: Path, loc: tuple, message: str) -> ExperimentError:
    """An error about a field found after loading (e.g. by an engine), with its YAML line."""
    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        root = None
    return ExperimentError(str(path), _line_of(root, loc), _field_path(loc), message)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the experiment file, for editors (`crossengine schema`)."""
    return Experiment.model_json_schema()
