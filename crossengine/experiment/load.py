"""Reading an experiment file: YAML to the typed schema, every error one line naming file:line: field.

Validation happens entirely before a results directory exists, so a bad experiment never
leaves anything behind. YAML is read with `yaml.safe_load` (after a duplicate-key
check, since silently keeping the last of two engines with one name hides mistakes);
nothing in it is evaluated, and user code loads only from an explicit "module:function".
The types themselves are in schema.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from crossengine.adapters import BUILTIN, engine_class, importable_from
from crossengine.errors import ExperimentError, first_problem
from crossengine.experiment.analyses import processed_dumps
from crossengine.experiment.files import field_path, is_dir, is_file, line_of, read_mapping, read_text
from crossengine.experiment.schema import (
    CONTROL_SUFFIX,
    Experiment,
    SampleSpec,
    engine_spec,
)
from crossengine.identity import BASE


def _first_error(exc: ValidationError, path: Path, root: yaml.Node | None, prefix: tuple = ()) -> ExperimentError:
    loc, msg = first_problem(exc)
    if exc.errors()[0]["type"] == "engine_field":  # said in full by schema.engine_spec
        msg = exc.errors()[0]["msg"]
    return ExperimentError(str(path), line_of(root, prefix + loc), field_path(prefix + loc), msg)


def _check_references(exp: Experiment, path: Path, root: yaml.Node | None) -> None:
    """Names that must point at engines; checked after typing so each error names its field."""

    def fail(loc: tuple, msg: str) -> None:
        raise ExperimentError(str(path), line_of(root, loc), field_path(loc), msg)

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
    _check_variants(exp, path, root)
    _check_noise(exp, fail)
    _check_routing(exp, fail)
    ref_spec = exp.resolved_engines()[exp.reference][2]
    if ref_spec.inputs == "own":
        fail(("engines", exp.reference, "inputs"), "the reference always prepares the inputs; `inputs: own` is for candidates")
    if exp.mode != "score" and any(spec.inputs == "own" for _, _, spec in exp.resolved_engines().values()):
        fail(("mode",), "`inputs: own` compares prompts before scoring them: mode score only (generate/greedy score the reference's prompts)")
    if ref_spec.refit is not None:
        fail(("engines", exp.reference, "refit"), "the reference cannot refit: a refit engine is a candidate, compared with the reference and with fresh loads of its checkpoints")
    if exp.mode != "score" and any(spec.refit is not None for _, _, spec in exp.resolved_engines().values()):
        fail(("mode",), "`refit` pushes weights between teacher-forced scores of each batch: mode score only")
    processed = processed_dumps(exp)
    if len({str(v) for v in processed.values()}) > 1:
        name = sorted(processed)[1]
        fail(("engines", name, "sampling"), f"dumps {', '.join(sorted(processed))} declare different processed log-probs: the scoring engines can compute one quantity")
    if len(exp.engines) + len(exp.variants) < 2:
        fail(("engines",), "need a reference and at least one candidate engine or variant")


def _check_noise(exp: Experiment, fail) -> None:
    """`noise.engines` names engines; an `expect` needs conditions to be checked under; a negative control's name is free."""

    names = {*exp.engines, *exp.variants}
    for name in exp.noise.engines if exp.noise is not None else ():
        if name not in names:
            fail(("noise", "engines", name), f"{name!r} is not one of the engines or variants {sorted(names)}")
    for name, (_, variant, spec) in exp.resolved_engines().items():
        section = ("engines" if variant == BASE else "variants", name)
        if spec.expect is not None and len(exp.noise_conditions(name)) == 0:
            fail(
                (*section, "expect"),
                f"expect: {spec.expect} is checked across the engine's noise conditions: give the experiment a `noise:` block (docs/guides/noise-floor.md) with conditions for this engine",
            )
        if spec.negative_control is not False and f"{name}{CONTROL_SUFFIX}" in names:
            fail((*section, "negative_control"), f"its control runs as {name}{CONTROL_SUFFIX!s}, which names another engine or variant; rename that one")


def _check_routing(exp: Experiment, fail) -> None:
    """`routing: true` needs engines that report it; `routing: replay` needs the reference's routing, so it is a candidate's."""

    for name, (_, variant, spec) in exp.resolved_engines().items():
        section = ("engines" if variant == BASE else "variants", name)
        if exp.routing and not engine_class(spec.type).traits.reports_routing:
            fail(("routing",), f"engine {name!r} ({spec.type}) cannot report routing; the engines that can: {', '.join(k for k in sorted(BUILTIN) if engine_class(k).traits.reports_routing)}")
        if spec.replays_reference_routing and (not exp.routing or name == exp.reference):
            fail(
                (*section, "routing"),
                "routing: replay routes a candidate with the reference's expert choices: it needs the experiment's `routing: true`, and the reference routes by itself"
                if name == exp.reference
                else "routing: replay needs the experiment's `routing: true` (the reference's expert choices are what it replays)",
            )


def _check_variants(exp: Experiment, path: Path, root: yaml.Node | None) -> None:
    """A variant's overrides are fields of its base engine's type, with that type's checks
    (schema.engine_spec, as for an engine); errors name the variant's field."""
    for name in exp.variants:
        try:
            engine_spec(exp.variant_fields(name))
        except ValidationError as e:
            raise _first_error(e, path, root, ("variants", name)) from None


def _check_paths(exp: Experiment, path: Path, root: yaml.Node | None) -> Experiment:
    """Resolve image and JSONL paths against the experiment's folder and check they exist."""
    base = path.parent
    samples: list[SampleSpec] = []
    for i, s in enumerate(exp.samples):
        if s.file is not None:
            f = s.file if s.file.is_absolute() else base / s.file
            if not is_file(f):
                raise ExperimentError(str(path), line_of(root, ("samples", i, "file")), f"samples[{i}].file", f"no such file: {f}")
            samples.extend(_read_jsonl(f, i))
            continue
        if s.dump is not None:
            samples.extend(_dump_samples(exp, s.dump, path, lambda msg, i=i: ExperimentError(str(path), line_of(root, ("samples", i, "dump")), f"samples[{i}].dump", msg)))
            continue
        images = []
        for j, img in enumerate(s.images):
            p = img if img.is_absolute() else base / img
            if not is_file(p):
                loc = ("samples", i, "images", j)
                raise ExperimentError(str(path), line_of(root, loc), field_path(loc), f"no such image file: {p}")
            images.append(p.resolve())
        s = _message_images(s, base, lambda loc, msg: ExperimentError(str(path), line_of(root, ("samples", i, *loc)), field_path(("samples", i, *loc)), msg))  # noqa: B023 (called at once)
        samples.append(s.model_copy(update={"images": images}))
    return exp.model_copy(update={"samples": _with_ids(samples, path, root)})


def _dump_samples(exp: Experiment, name: str, path: Path, error) -> list[SampleSpec]:
    """One token_ids sample per record of engine `name`'s dump, holding only its id and where it is
    (its engine's `records().index()`): the records themselves are read a batch at a time."""

    resolved = exp.resolved_engines()
    if name not in resolved:
        raise error(f"{name!r} is not one of the engines {sorted(resolved)}")
    spec = resolved[name][2]
    cls = engine_class(spec.type)
    if not cls.traits.has_records:
        raise error(f"engine {name!r} ({spec.type}) holds no samples of its own; `dump` names an engine that does (e.g. type: logprobs)")
    spec = resolve_named_paths(spec, path.parent, lambda loc, msg: error(f"engine {name!r}: {'.'.join(loc)}: {msg}"))
    out: list[SampleSpec] = []
    seen: dict[str, str] = {}
    try:
        index = list(cls.records(spec).index())
    except ValueError as exc:  # a file that is not the format its name says (RecordError names it)
        raise error(f"engine {name!r}: {exc}") from None
    for rid, pointer, where in index:
        if rid in seen:
            raise ExperimentError(where.rsplit(":", 1)[0], _where_line(where), "id", f"duplicate record id {rid!r} (first at {seen[rid]})")
        seen[rid] = where
        sample = SampleSpec(id=rid, dump=name)
        sample._record = pointer
        out.append(sample)
    if not out:
        raise error(f"the dump of engine {name!r} holds no records")
    return out


def _where_line(where: str) -> int | None:
    tail = where.rsplit(":", 1)[1].replace("row ", "")
    return int(tail) if tail.isdigit() else None


def resolve_named_paths(spec, base: Path, error):
    """A spec whose `named_paths()` are absolute (relative ones against `base`, the experiment's folder)
    and exist; `error(loc, message)` makes the one-line error for one that does not."""
    for loc, value in spec.named_paths():
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (base / p).absolute()
        if is_dir(p):
            raise error(loc, f"{p} is a folder; name a file")
        if not is_file(p):
            raise error(loc, f"no such file: {p}")
        spec = spec.model_copy(update={loc[0]: str(p)})
    return spec


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
                    if not is_file(p):
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
                raise ExperimentError(str(path), line_of(root, ("samples",)), "samples", f"duplicate sample id {s.id!r}")
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
    for n, line in enumerate(read_text(f, f"samples[{index}].file").splitlines(), start=1):
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
            if not is_file(p):
                raise ExperimentError(str(f), n, "images", f"no such image file: {p}")
        spec = _message_images(spec, f.parent, lambda loc, msg: ExperimentError(str(f), n, field_path(loc), msg))  # noqa: B023 (called at once)
        out.append(spec.model_copy(update={"images": [p.resolve() for p in images]}))
    if not out:
        raise ExperimentError(str(f), None, f"samples[{index}].file", "the file holds no samples")
    return out


def set_field(data: dict, dotted: str, value) -> None:
    """data[a][b][c] = value for 'a.b.c', making the mappings on the way (a sweep's axis)."""
    *head, last = dotted.split(".")
    node = data
    for key in head:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value


def load_experiment(path: str | Path, overrides: dict[str, object] | None = None) -> Experiment:
    """Read, validate and resolve an experiment file; raises ExperimentError (one line).
    `overrides` ('engines.cand.dtype' -> value) are set before validation: a sweep member is its
    base experiment with its axes' values, its relative paths still against the base's folder."""
    path = Path(path)
    data, root = read_mapping(path, "experiment", "an experiment is a YAML mapping of fields")
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "experiment")
    for dotted, value in (overrides or {}).items():
        set_field(data, dotted, value)
    try:
        with importable_from(path.parent):  # an engine `type: module:Class` imports as its worker will
            exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, path, root) from None
    with importable_from(path.parent):
        _check_references(exp, path, root)
    exp = _check_paths(exp, path, root)
    _check_native_inputs(exp, path, root)
    return exp


def _check_native_inputs(exp: Experiment, path: Path, root: yaml.Node | None) -> None:
    """A reference that prepares images with its own code (a native `preprocess`) names image inputs
    its own way (Molmo's `images`, `image_input_idx`): another engine given them would run without
    images, since models ignore inputs they do not know. Such candidates must prepare their own inputs."""
    ref_spec = exp.resolved_engines()[exp.reference][2]
    has_images = any(s.images or any(isinstance(m.content, list) and any(p.type == "image" for p in m.content) for m in s.messages or []) for s in exp.samples)
    if ref_spec.input_pipeline is None or not has_images:
        return
    for name, (_, variant, spec) in exp.resolved_engines().items():
        if name != exp.reference and spec.inputs == "reference" and spec.input_pipeline != ref_spec.input_pipeline:
            loc = ("engines", name) if variant == BASE else ("variants", name)
            raise ExperimentError(
                str(path),
                line_of(root, loc),
                field_path(loc),
                f"the reference {exp.reference!r} prepares images with its own preprocess ({ref_spec.input_pipeline}), whose inputs this engine cannot read: give it `inputs: own`",
            )


def experiment_error(path: Path, loc: tuple, message: str) -> ExperimentError:
    """An error about a field found after loading (e.g. by an engine), with its YAML line."""
    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        root = None
    return ExperimentError(str(path), line_of(root, loc), field_path(loc), message)
