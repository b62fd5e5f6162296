"""From a validated experiment to what will run: engine instances, model paths, batches, waves.

Everything here is decided before any engine starts, so a wrong model path is reported
in one line and no results folder is made. config.py is the schema (types, names, YAML
line numbers); every resolution against the file system (model folders, fixtures, LoRA
adapters, another environment's python) happens here, once, with the field's file:line.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from crossengine.adapters import engine_class
from crossengine.adapters.base import EngineTraits
from crossengine.adapters.checkpoint import config_fields, model_is_dense, vocab_size_of
from crossengine.compare.noise import BATCHINGS, NoisePlan
from crossengine.errors import CrossengineError, first_problem
from crossengine.experiment.analyses import records_routing, score_as, skipped_lines
from crossengine.experiment.files import exists, is_dir, is_file
from crossengine.experiment.fixtures import FIXTURES, ensure_fixture, is_fixture
from crossengine.experiment.load import experiment_error, resolve_named_paths
from crossengine.experiment.schema import CONTROL_SUFFIX, NAME, EngineSpec, Experiment
from crossengine.identity import BASE

if TYPE_CHECKING:
    from crossengine.compare.noise import NoisePlan


@dataclass(frozen=True)
class EngineInstance:
    name: str  # the experiment's key: an engine or a variant
    cand_engine: str  # the engine it is (a variant's base)
    variant: str  # identity.BASE for an engine itself
    spec: EngineSpec
    model_path: str
    is_reference: bool

    @property
    def traits(self) -> EngineTraits:
        """What its engine can do (crossengine/adapters/base.py); what the core reads instead of the engine's name."""
        return engine_class(self.spec.type).traits

    def tensor_blocker(self) -> str | None:
        """Why this engine's logits cannot travel as torch tensors (Ray Direct Transport), or None; read by the
        transport choice and by the plan's `skipped:` lines alike."""
        if not self.traits.tensor_logits:
            return f"({self.spec.type}) hands over host arrays"
        if self.spec.env is not None:
            return "runs in its own Python environment"
        if self.spec.replays_reference_routing:
            return "replays the reference's routing (it reads the reference's scores before its own forward)"
        return None

    @property
    def full_logits(self) -> bool:
        """Whether it gives full-vocabulary logits (its traits, and the option they name)."""
        return self.traits.gives_full_logits(self.spec)

    def is_dense(self) -> bool | None:
        """Whether its model is dense (no experts in its config.json); None where that does not read
        (the dense-only alarms then stay on)."""
        fields = config_fields(self.model_path, self.spec.revision)
        return None if fields is None else model_is_dense(fields)


@dataclass
class Plan:
    experiment: Experiment
    experiment_path: Path
    run_id: str
    run_dir: Path
    reference: EngineInstance
    candidates: list[EngineInstance]
    batches: list[list[int]]  # sample indices per batch
    fingerprint: str
    files: dict[str, str]  # every file the experiment names (images, chat templates, adapters) -> hash of its content

    def samples_fingerprint(self) -> str:
        return samples_fingerprint(self.experiment, self.files)

    @property
    def instances(self) -> list[EngineInstance]:
        return [self.reference, *self.candidates]

    def names(self) -> set[str]:
        return {i.name for i in self.instances}

    def instance(self, name: str) -> EngineInstance:
        """The engine or variant (or negative control) of that name."""
        return next(i for i in self.instances if i.name == name)

    def noise_plan(self, inst: EngineInstance) -> NoisePlan | None:
        """The noise conditions `inst` runs (crossengine/compare/noise.py), or None: no floor for it."""

        noise = self.experiment.noise
        if noise is None or inst.traits.has_records or inst.spec.refit is not None:  # a dump's numbers are a file: nothing to vary; a refit engine's
            return None  # control is a fresh load of its weights (crossengine/adapters/refit.py)
        left = self._batchings_left(inst)
        names = [c for c in self.experiment.noise_conditions(inst.name) if c not in left]
        expanded = tuple(x for c in names for x in ([f"repeat{k}" for k in range(1, noise.repeats + 1)] if c == "repeat" else [c]))
        return NoisePlan(expanded, noise.fillers, noise.seed) if expanded else None

    def _batchings_left(self, inst: EngineInstance) -> set[str]:
        """The batching conditions `inst` cannot vary: all of them without the batching trait, or with `routing: true`
        (routing is read one sample per forward)."""

        return set(BATCHINGS) if not inst.traits.batching or self.experiment.routing else set()

    def lines(self) -> list[str]:
        """What the run will do that the plan already knows, said by `run` and `validate` before anything loads."""
        return [*skipped_lines(self), *self.noise_lines(), *self.budget_lines(), *self.refit_lines()]

    def refit_lines(self) -> list[str]:
        """What each `refit:` engine will push, said before anything loads."""
        out = []
        for inst in self.instances:
            r = inst.spec.refit
            if r is not None:
                how = f"through {r.update}" if r.update else "by the built-in sync"
                cache = "its prefix cache reset after each push" if r.reset_prefix_cache else "its prefix cache kept across pushes (reset_prefix_cache: false)"
                out.append(
                    f"refit: {inst.name} loads {inst.spec.model or self.experiment.model}, then pushes {' -> '.join(r.label(i) for i in range(len(r.to)))} {how}, "
                    f"{cache}, scoring after each; each is loaded fresh after the last batch as the control"
                )
        return out

    def budget_lines(self) -> list[str]:
        """Where placement.logits_budget_gb splits samples into position blocks, and which engines cannot."""
        exp = self.experiment
        budget = exp.placement.logits_budget_gb
        if budget is None or not exp.full_vocab:
            return []
        vocab = vocab_size_of(self.reference.model_path, self.reference.spec.revision)
        beyond = f"beyond {int(budget * 2**30 // (4 * vocab)):,} tokens (V = {vocab:,})" if vocab else "whose logits exceed it"
        able = [i.name for i in self.instances if i.traits.chunks_logits]
        return [f"logits budget {budget:g} GiB per worker: {', '.join(able) or 'no engine'} score{'s' if len(able) == 1 else ''} samples {beyond} in position blocks"]

    def noise_lines(self) -> list[str]:
        """What the noise floor will vary, per engine, said before anything loads (and what does not apply)."""
        if self.experiment.noise is None:
            return []
        out = []
        for inst in self.instances:
            plan = self.noise_plan(inst)
            asked = self.experiment.noise_conditions(inst.name)
            left = [c for c in asked if c in self._batchings_left(inst)]
            cause = "routing: true reads routing one sample per forward" if inst.traits.batching else f"{inst.spec.type} engines have no batching field"
            why = f" ({', '.join(left)} do{'es' if len(left) == 1 else ''} not apply: {cause})" if left else ""
            why = " (a refit engine: its control is a fresh load of its checkpoints)" if inst.spec.refit is not None and asked else why
            out.append(f"noise floor: {inst.name}: {', '.join(plan.conditions) if plan else 'none'}{why}")
        return out

    def score_as(self) -> dict | None:
        """What the torch engines score (Experiment.score_as): passed to every worker at load."""
        return score_as(self.experiment)

    def routed(self) -> set[str]:
        """The engines that record routing: all with `routing: true`, but a dump that records none (said as a skipped line)."""
        return {i.name for i in self.instances if self.experiment.routing and records_routing(i, self)}

    def records(self, name: str):
        """The record source of engine `name` (samples taken from its dump), opened once per plan."""
        cache = self.__dict__.setdefault("_records", {})
        if name not in cache:
            inst = self.instance(name)
            source = engine_class(inst.spec.type).records(inst.spec)
            source.vocab_size = vocab_size_of(self.reference.model_path, self.reference.spec.revision)  # ids beyond it: refused, naming the record
            cache[name] = source
        return cache[name]


def looks_like_path(model: str) -> bool:
    """Hub ids are 'org/name'; anything else with a separator or a dot prefix is a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def resolve_model(model: str, experiment_path: Path, loc: tuple) -> str:
    """Fixture name -> built folder; existing path -> absolute path; else a hub id, as given."""
    if is_fixture(model):
        return str(ensure_fixture(model, seed=0))
    for base in (Path.cwd(), experiment_path.parent):
        try:
            candidate = (base / Path(model).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError):  # a name the OS refuses, a NUL, a ~user that is no user
            break
        if exists(candidate):
            return str(candidate)
    if looks_like_path(model):
        raise experiment_error(experiment_path, loc, f"no such model directory: {model}")
    problem = hub_problem(model)
    if problem:
        raise experiment_error(experiment_path, loc, problem)
    return model


HUB_TIMEOUT_S = 5.0


def hub_problem(repo: str, revision: str | None = None) -> str | None:
    """Why a hub id cannot load here, known in seconds instead of after the hub client's minute of
    retries: not in the local cache and the hub unreachable, or no such repository. None when it
    is cached or the hub answers (gated or private repositories are left to the engines to say)."""
    import huggingface_hub
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except HFValidationError:
        return f"model {repo!r} is not a fixture name ({', '.join(sorted(FIXTURES))}), not a local folder, and not a hub id (org/name)"
    if isinstance(cached, str):
        return None  # cached: the engines load it from there
    if constants.HF_HUB_OFFLINE:
        return f"model {repo!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: download it first or give a local path"
    try:
        huggingface_hub.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:  # exists; access is the engines' to report
        return None
    except RepositoryNotFoundError:
        return f"model {repo!r} is not a local folder and the hub has no such repository (or it is private: log in with `hf auth login`)"
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, timeout: all mean the same here
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return (
            f"model {repo!r} is not a local folder and not in the Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) cannot be reached within {HUB_TIMEOUT_S:g}s ({type(exc).__name__}: {reason}): "
            "download it where there is network or give a local path"
        )
    return None


def resolve_python(spec: EngineSpec, experiment_path: Path, loc: tuple) -> EngineSpec:
    """An engine's `env.python`, relative to the experiment file, made absolute (the worker starts it from anywhere)."""
    python = Path(spec.env.python).expanduser()
    python = python if python.is_absolute() else (experiment_path.parent / python).absolute()
    if not exists(python):
        hint = engine_class(spec.type).traits.environment_hint
        hint = f" ({hint})" if hint else ""
        raise experiment_error(experiment_path, loc, f"no such interpreter: {python}{hint}")
    return spec.model_copy(update={"env": spec.env.model_copy(update={"python": str(python)})})


def resolve_refit(refit, experiment_path: Path, loc: tuple):
    """`refit.to` resolved like `model` (fixture, folder, hub id), each with its file:line; the names as written kept as labels."""
    paths = [resolve_model(to, experiment_path, (*loc, j) if len(refit.to) > 1 else loc) for j, to in enumerate(refit.to)]
    return refit.model_copy(update={"to": paths, "labels": refit.labels or list(refit.to)})


def resolve_adapter(lora: str, experiment_path: Path, loc: tuple) -> str:
    """Fixture name -> built folder; else a local folder with adapter_config.json (relative to cwd or the experiment)."""
    if is_fixture(lora):
        return str(ensure_fixture(lora, seed=0))
    for base in (Path.cwd(), experiment_path.parent):
        candidate = (base / Path(lora).expanduser()).resolve()
        if is_file(candidate / "adapter_config.json"):
            return str(candidate)
        if is_dir(candidate):
            raise experiment_error(experiment_path, loc, f"{candidate} has no adapter_config.json: not a PEFT adapter folder")
    raise experiment_error(experiment_path, loc, f"no such adapter folder: {lora}")


def samples_fingerprint(exp: Experiment, files: dict[str, str]) -> str:
    """Hash of every sample (ids, texts, images, token ids): two runs of the same samples share it.
    Images count by content (`files`: the plan's SHA-256 of each, not read again), so the same
    experiment copied elsewhere has the same samples."""
    h = hashlib.sha256()
    for s in exp.samples:
        h.update(json.dumps(s.model_dump(mode="json", exclude={"images"}), sort_keys=True).encode())
        for img in s.images:
            h.update(bytes.fromhex(files[str(img)]))
    return h.hexdigest()[:16]


def fingerprint(exp: Experiment, files: dict[str, str]) -> str:
    """What a resumed run must share with the run it continues (run_id/output excluded): the
    experiment and the content of every file it names, so that an image replaced between a stop
    and its resume is not scored under the same path."""
    data = exp.model_dump(mode="json", exclude={"run_id", "output_dir"})
    return hashlib.sha256(json.dumps([data, sorted(files.items())], sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex), read once per run: the run's samples fingerprint reuses it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def named_files(exp: Experiment, instances: list[EngineInstance]) -> dict[str, str]:
    """path -> content hash of the files a run reads besides the model: sample images (chat image
    parts too), chat templates, LoRA adapter files. (JSONL samples are in the experiment itself.)"""
    paths: set[Path] = set()
    for s in exp.samples:
        paths.update(Path(p) for p in s.images)
        for m in s.messages or []:
            if isinstance(m.content, list):
                paths.update(Path(part.path) for part in m.content if part.path is not None)
    for inst in instances:
        if inst.spec.chat_template:
            paths.add(Path(inst.spec.chat_template))
        if inst.spec.lora:
            paths.update(f for f in Path(inst.spec.lora).glob("adapter_*") if f.is_file())
        paths.update(Path(p) for _, p in inst.spec.named_paths())  # a dump: its content is what is compared
    return {str(p): file_digest(p) for p in sorted(paths)}


def control(exp: Experiment, experiment_path: Path, inst: EngineInstance) -> EngineInstance:
    """An engine's negative control: the same engine without its claimed setting, a candidate named NAME.control."""
    section = "engines" if inst.variant == BASE else "variants"
    try:
        spec = type(inst.spec).model_validate(inst.spec.control_fields())
    except ValidationError as exc:
        loc, msg = first_problem(exc)
        raise experiment_error(experiment_path, (section, inst.name, "negative_control", *loc), f"its control is not a valid engine: {msg}") from None
    name = f"{inst.name}{CONTROL_SUFFIX}"
    return EngineInstance(name, inst.cand_engine, name, spec, inst.model_path, False)


def check_routable(exp: Experiment, experiment_path: Path, instances: list[EngineInstance]) -> None:
    """`routing: true` on a model without experts is a one-line error before anything loads (its config.json says so)."""

    for inst in instances:
        fields = config_fields(inst.model_path, inst.spec.revision)
        if fields is not None and model_is_dense(fields):
            raise experiment_error(experiment_path, ("routing",), f"engine {inst.name!r} runs {inst.model_path}, a dense model (no experts in its config.json): there is no routing to record")


def make_plan(exp: Experiment, experiment_path: Path, run_id: str | None = None, output_dir: Path | None = None) -> Plan:
    instances = []
    for name, (cand_engine, variant, spec) in exp.resolved_engines().items():
        section = "engines" if variant == BASE else "variants"
        if spec.model == exp.model:
            loc: tuple = ("model",)
        elif variant != BASE and spec.model == exp.engines[cand_engine].model:
            loc = ("engines", cand_engine, "model")
        else:
            loc = (section, name, "model")
        path = resolve_model(spec.model, experiment_path, loc)
        if spec.env is not None and spec.env.python:
            spec = resolve_python(spec, experiment_path, (section, name, "env", "python"))
        if spec.chat_template:
            template = Path(spec.chat_template).expanduser()
            template = template if template.is_absolute() else (experiment_path.parent / template).absolute()
            if not is_file(template):
                raise experiment_error(experiment_path, (section, name, "chat_template"), f"no such chat template file: {template}")
            spec = spec.model_copy(update={"chat_template": str(template)})
        if spec.lora:
            spec = spec.model_copy(update={"lora": resolve_adapter(spec.lora, experiment_path, (section, name, "lora"))})
        if spec.refit:
            spec = spec.model_copy(update={"refit": resolve_refit(spec.refit, experiment_path, (section, name, "refit", "to"))})
        spec = resolve_named_paths(spec, experiment_path.parent, lambda loc, msg, at=(section, name): experiment_error(experiment_path, (*at, *loc), msg))
        instances.append(EngineInstance(name, cand_engine, variant, spec, path, name == exp.reference))
    instances += [control(exp, experiment_path, i) for i in instances if i.spec.negative_control is not False]
    if exp.routing:
        check_routable(exp, experiment_path, instances)
    if run_id is not None and not NAME.match(run_id):
        raise CrossengineError(f"--run-id {run_id!r}: must match {NAME.pattern} (it names a folder under the output folder)")
    run_id = run_id or exp.run_id or f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(output_dir or exp.output_dir).absolute()  # Ray workers run in other folders: every path they get is absolute
    n = len(exp.samples)
    batches = [list(range(i, min(i + exp.batch_size, n))) for i in range(0, n, exp.batch_size)]
    ref = next(i for i in instances if i.is_reference)
    files = named_files(exp, instances)
    return Plan(exp, experiment_path, run_id, out / run_id, ref, [i for i in instances if not i.is_reference], batches, fingerprint(exp, files), files)
