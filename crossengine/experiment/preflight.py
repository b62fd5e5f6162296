"""Checks that need only the experiment, its files and the reference's tokenizer/processor.

No Ray, no weights: a second or two. `crossengine validate` and `crossengine run` (before
Ray starts, before a results folder exists) both run them, so a file that `run` would
reject after loading engines is rejected up front, in one line naming the file, line and
field. What can only be known by an engine (a prompt too long for one of them) stays a
per-sample error of the run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from crossengine.adapters import import_ref, importable_from
from crossengine.experiment.load import experiment_error
from crossengine.experiment.plan import Plan
from crossengine.experiment.schema import Experiment


def preflight(plan: Plan) -> list[str]:
    """Raise ExperimentError on the first problem; return notes on checks that could not run."""
    exp, path = plan.experiment, plan.experiment_path
    _check_user_code(exp, path)
    _check_images(exp, path)
    _check_adapters(plan)
    _check_remote_code(plan)
    return _check_with_tokenizer(plan)


def _check_remote_code(plan: Plan) -> None:
    """A model whose config names its own classes (auto_map) under a type transformers does not
    know runs only with trust_remote_code, which is off unless asked: say so before loading.
    Native engines read such a config as plain fields and run their own code instead."""

    from transformers import CONFIG_MAPPING

    exp = plan.experiment
    for inst in plan.instances:
        config = Path(inst.model_path) / "config.json"
        if not inst.traits.runs_model_code or inst.spec.trust_remote_code or not config.is_file():
            continue  # a hub id: transformers says it at load time
        fields = json.loads(config.read_text())
        if fields.get("auto_map") and fields.get("model_type") not in CONFIG_MAPPING:
            raise experiment_error(
                plan.experiment_path,
                (_section(exp, inst.name), inst.name),
                f"engine {inst.name!r}: model {inst.spec.model} is remote code "
                f"(model_type {fields.get('model_type')!r} with its own classes in config.json's auto_map); set trust_remote_code: true to run its code",
            )


def _section(exp: Experiment, name: str) -> str:
    return "engines" if name in exp.engines else "variants"


def _check_user_code(exp: Experiment, path: Path) -> None:
    """Every 'module:function' the experiment names must import and be callable, as `run` will need it
    (importing is all that runs of it here; its module's top level, as a worker would)."""

    for name, (_, _, spec) in exp.resolved_engines().items():
        for field, ref in spec.user_code():
            loc = (_section(exp, name), name, *field)
            try:
                with importable_from(path.parent):  # where the workers import it from
                    obj = import_ref(ref)
            except ImportError as exc:
                raise experiment_error(path, loc, str(exc)) from None
            if not callable(obj):
                raise experiment_error(path, loc, f"{ref!r} is {type(obj).__name__} {obj!r:.40}, not a function")


def adapter_modules(adapter: str) -> dict[str, tuple[list[int], list[int]]]:
    """module name -> (lora_A shape, lora_B shape), from the adapter's safetensors header."""

    with open(Path(adapter) / "adapter_model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out: dict[str, tuple[list[int], list[int]]] = {}
    for key, t in header.items():
        for part, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                module = key.removesuffix(part).removeprefix("base_model.model.")
                out.setdefault(module, ([], []))[i].extend(t["shape"])
    return out


def _check_adapters(plan: Plan) -> None:
    """Every LoRA adapter must fit its engine's model: each target module present, with the adapter's shapes.

    The model is built on the meta device from its config (no weights, a second), so its
    module names and Linear sizes are exactly what PEFT and vLLM will see.
    """
    exp, path = plan.experiment, plan.experiment_path
    trees: dict[str, dict] = {}
    for inst in plan.instances:
        if not inst.spec.lora:
            continue
        loc = (_section(exp, inst.name), inst.name, "lora")
        try:
            modules = adapter_modules(inst.spec.lora)
        except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
            weights = Path(inst.spec.lora) / "adapter_model.safetensors"
            what = f"{weights} is not a safetensors file ({weights.stat().st_size} bytes)" if weights.is_file() else f"cannot read {weights}: {exc}"
            raise experiment_error(path, loc, f"engine {inst.name!r}: {what}") from None
        if inst.model_path not in trees:
            trees[inst.model_path] = _meta_linears(inst)
        linears = trees[inst.model_path]
        if linears is None:
            continue  # the model does not build here (own environment, remote code): the engine reports it
        for module, (a, b) in sorted(modules.items()):
            if module not in linears:
                close = [m for m in linears if m.rpartition(".")[2] == module.rpartition(".")[2]][:2]
                hint = f" (it has e.g. {', '.join(close)})" if close else ""
                raise experiment_error(path, loc, f"engine {inst.name!r}: the adapter targets {module}, which model {inst.spec.model} does not have{hint}: an adapter for another base model?")
            fan_in, fan_out = linears[module]
            if len(a) == 2 and a[1] != fan_in or len(b) == 2 and b[0] != fan_out:
                raise experiment_error(
                    path,
                    loc,
                    f"engine {inst.name!r}: the adapter's {module} maps {a[1]} -> {b[0]} features but the model's maps {fan_in} -> {fan_out}: an adapter for another base model (hidden size)?",
                )


def _meta_linears(inst) -> dict[str, tuple[int, int]] | None:
    try:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
        )

        common = dict(trust_remote_code=inst.spec.trust_remote_code)
        config = AutoConfig.from_pretrained(inst.model_path, revision=inst.spec.revision, **common)
        cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
        with torch.device("meta"):
            model = cls.from_config(config, **common)
    except Exception:  # noqa: BLE001
        return None
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")}


def _check_images(exp: Experiment, path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    for i, s in enumerate(exp.samples):
        for j, img in enumerate(s.images):
            try:
                with Image.open(img) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise experiment_error(path, ("samples", i, "images", j), f"{img} is not an image this machine can read: {exc}") from None


def _check_with_tokenizer(plan: Plan) -> list[str]:
    """Token ids inside the vocabulary; one image placeholder per image."""
    exp, path = plan.experiment, plan.experiment_path
    ref = plan.reference
    if ref.traits.expands_images:
        for i, s in enumerate(exp.samples):
            if s.images:  # such an engine expands images inside itself; the reference's ids must come from a processor
                raise experiment_error(
                    path, ("samples", i), f"image prompts need a reference that prepares pixels (hf, native); {ref.spec.type} expands images inside its engine, so it can only be a candidate for them"
                )
    common = dict(revision=ref.spec.revision, trust_remote_code=ref.spec.trust_remote_code)
    try:
        from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig

        fields, _ = PretrainedConfig.get_config_dict(ref.model_path, revision=ref.spec.revision)  # JSON only: no model code runs
        vocab = (fields.get("text_config") or {}).get("vocab_size") or fields.get("vocab_size")
        own_pipeline = ref.spec.input_pipeline is not None  # the training code processes images itself
        processor = AutoProcessor.from_pretrained(ref.model_path, **common) if any(s.images for s in exp.samples) and not own_pipeline else None
        if processor is None:
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # a remote-code model type read as plain fields is expected here, not a warning
            try:
                AutoTokenizer.from_pretrained(ref.model_path, **common)  # loads, or the note below says why not
            finally:
                hf_logging.set_verbosity(level)
    except Exception as exc:  # noqa: BLE001 - offline hub id, or files only the engine's own environment reads
        return [f"tokenizer checks skipped: the reference's tokenizer did not load here, the engine checks at run time ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    for i, s in enumerate(exp.samples):
        if s.token_ids is not None and vocab is not None:
            for j, t in enumerate(s.token_ids):
                if t >= vocab:
                    raise experiment_error(path, ("samples", i, "token_ids", j), f"token id {t} >= vocab size {vocab} of {ref.name}")
        if s.images and processor is not None:
            marks = [m for m in (getattr(processor, a, None) for a in ("boi_token", "image_token")) if isinstance(m, str) and m]
            for mark in marks:
                if mark in s.text:
                    n = s.text.count(mark)
                    if n != len(s.images):
                        raise experiment_error(path, ("samples", i, "text"), f"the text has {n} {mark} placeholder(s) for {len(s.images)} image(s)")
                    break
            else:
                if marks:  # the processor would fail on it in the run, sample by sample
                    raise experiment_error(path, ("samples", i, "text"), f"the text has no {marks[0]} placeholder for its {len(s.images)} image(s): write one where each image goes")
    return []
