"""Checks that need only the experiment, its files and the reference's tokenizer/processor.

No Ray, no weights: a second or two. `crossengine validate` and `crossengine run` (before
Ray starts, before a results folder exists) both run them, so a file that `run` would
reject after loading engines is rejected up front, in one line naming the file, line and
field. What can only be known by an engine (a prompt too long for one of them) stays a
per-sample error of the run.
"""

from __future__ import annotations

from pathlib import Path

from .config import Experiment, experiment_error
from .plan import Plan


def preflight(plan: Plan) -> list[str]:
    """Raise ExperimentError on the first problem; return notes on checks that could not run."""
    exp, path = plan.experiment, plan.experiment_path
    _check_user_code(exp, path)
    _check_images(exp, path)
    return _check_with_tokenizer(plan)


def _section(exp: Experiment, name: str) -> str:
    return "engines" if name in exp.engines else "variants"


def _check_user_code(exp: Experiment, path: Path) -> None:
    """Every 'module:function' the experiment names must import (that is all that runs of it here)."""
    from .adapters import import_ref
    from .adapters.patches import BUILTIN

    for name, (_, _, spec) in exp.resolved_engines().items():
        refs = [("factory", spec.factory), ("preprocess", spec.preprocess)]
        refs += [(("patches", j), p) for j, p in enumerate(spec.patches) if p not in BUILTIN]
        for field, ref in refs:
            if ref is None:
                continue
            try:
                import_ref(ref)
            except ImportError as exc:
                loc = (_section(exp, name), name, *(field if isinstance(field, tuple) else (field,)))
                raise experiment_error(path, loc, str(exc)) from None


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
    if ref.spec.type == "vllm":
        for i, s in enumerate(exp.samples):
            if s.images:  # vLLM expands images itself; the reference's ids must come from an HF processor
                raise experiment_error(path, ("samples", i), "image prompts need an hf reference to expand them (vLLM expands them itself as a candidate)")
    common = dict(revision=ref.spec.revision, trust_remote_code=ref.spec.trust_remote_code)
    try:
        from transformers import AutoConfig, AutoProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(ref.model_path, **common)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        processor = AutoProcessor.from_pretrained(ref.model_path, **common) if any(s.images for s in exp.samples) else None
        if processor is None:
            AutoTokenizer.from_pretrained(ref.model_path, **common)  # loads, or the note below says why not
    except Exception as exc:  # noqa: BLE001 - offline hub id, or files only the engine's own environment reads
        return [f"tokenizer checks skipped: the reference's tokenizer did not load here, the engine checks at run time ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    for i, s in enumerate(exp.samples):
        if s.token_ids is not None and vocab is not None:
            for j, t in enumerate(s.token_ids):
                if t >= vocab:
                    raise experiment_error(path, ("samples", i, "token_ids", j), f"token id {t} >= vocab size {vocab} of {ref.name}")
        if s.images and processor is not None:
            for attr in ("boi_token", "image_token"):
                mark = getattr(processor, attr, None)
                if isinstance(mark, str) and mark and mark in s.text:
                    n = s.text.count(mark)
                    if n != len(s.images):
                        raise experiment_error(path, ("samples", i, "text"), f"the text has {n} {mark} placeholder(s) for {len(s.images)} image(s)")
                    break
    return []
