"""Tiny, deterministic models built offline from a config and a seed.

There is no model hub on CI, so every model a test or the quickstart uses is made here:
random weights plus a byte-level BPE tokenizer trained on a built-in paragraph. The
checkpoints use the canonical hub layout, so HF, vLLM and native code load them the same
way a real checkpoint would be loaded (`model: tiny-text` in an experiment is resolved to
the folder this module writes; a hub id or local path goes through the same engines).

    crossengine fixtures build            # writes all fixtures (also done on demand)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from crossengine.experiment.fixture_builders import (
    build_tiny_mixtral,
    build_tiny_moe,
    build_tiny_molmo,
    build_tiny_olmo2,
    build_tiny_remote,
    build_tiny_text,
    build_tiny_text_32k,
    build_tiny_vision,
    seed_all,
)
from crossengine.experiment.shapes import SHAPES

FIXTURE_VERSION = "2"


def fixtures_home() -> Path:
    """Where fixtures live; outside the repo so a clean clone never carries weights."""
    root = os.environ.get("CROSSENGINE_HOME") or Path.home() / ".cache" / "crossengine"
    return Path(root) / "fixtures"


# LoRA adapters (PEFT folders) on the text and vision fixtures; rank 8, alpha 16.
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_VISION_TARGETS = r".*(self_attn\.(q_proj|k_proj|v_proj|o_proj|out_proj)|mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))$"  # both towers


def _build_lora(out: Path, seed: int, base: str, targets, b_std: float) -> None:
    """A PEFT LoRA adapter on fixture `base`. PEFT initialises B to zero (the adapter is then the
    identity); `b_std > 0` draws B at random so the adapter really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    base_path = ensure_fixture(base, seed)
    config = AutoConfig.from_pretrained(base_path)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    model = cls.from_pretrained(base_path, dtype=torch.float32)
    seed_all(seed + 1)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    if b_std:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, b_std)
    peft_model.save_pretrained(out)


def _build_tiny_text_lora(out: Path, seed: int) -> None:
    _build_lora(out, seed, "tiny-text", _TEXT_TARGETS, b_std=0.02)


def _build_tiny_text_lora_zero(out: Path, seed: int) -> None:
    _build_lora(out, seed, "tiny-text", _TEXT_TARGETS, b_std=0.0)


def _build_tiny_vision_lora(out: Path, seed: int) -> None:
    _build_lora(out, seed, "tiny-vision", _VISION_TARGETS, b_std=0.05)


NUDGED_PARAMETER = "model.layers.1.mlp.gate_proj.weight"  # tiny-text-nudged: this weight + 1e-3, nothing else


def _build_tiny_text_nudged(out: Path, seed: int) -> None:
    """tiny-text with one MLP weight of layer 1 moved by 1e-3: a bug planted where a localisation must find it (in
    vLLM, gate_proj is half of the fused gate_up_proj)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = ensure_fixture("tiny-text", seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        dict(model.named_parameters())[NUDGED_PARAMETER].add_(1e-3)
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


DRIFT_STEPS = 3  # tiny-text-step1 .. tiny-text-step3
DRIFT_STD = 0.01  # per step, relative to each weight's own std


def _build_drift_step(step: int) -> Callable[[Path, int], None]:
    """tiny-text as an RL run's checkpoint after `step` updates: each step adds seeded noise of
    DRIFT_STD times each weight's std, cumulatively (step k = step k−1 + its own noise), so the
    checkpoints drift further from tiny-text, step by step, like a policy under training."""

    def build(out: Path, seed: int) -> None:

        import torch
        from transformers import AutoModelForCausalLM

        base = ensure_fixture("tiny-text", seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for k in range(1, step + 1):
                g = torch.Generator().manual_seed(seed * 1000 + k)
                for _, p in sorted(model.named_parameters()):
                    p.add_(torch.randn(p.shape, generator=g) * DRIFT_STD * p.std())
        model.save_pretrained(out)
        for f in base.iterdir():  # the base's tokenizer files as they are (saved for transformers 4.x too)
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, out / f.name)

    return build


FIXTURES: dict[str, Callable[[Path, int], None]] = {
    "tiny-text": build_tiny_text,
    "tiny-text-32k": build_tiny_text_32k,
    "tiny-vision": build_tiny_vision,
    "tiny-olmo2": build_tiny_olmo2,
    "tiny-moe": build_tiny_moe,
    "tiny-mixtral": build_tiny_mixtral,
    "tiny-remote": build_tiny_remote,
    "tiny-molmo": build_tiny_molmo,
    "tiny-text-lora": _build_tiny_text_lora,
    "tiny-text-lora-zero": _build_tiny_text_lora_zero,
    "tiny-vision-lora": _build_tiny_vision_lora,
    "tiny-text-nudged": _build_tiny_text_nudged,
    **{f"tiny-text-step{k}": _build_drift_step(k) for k in range(1, DRIFT_STEPS + 1)},
    **SHAPES,  # real shapes (crossengine/experiment/shapes.py): built when named
}


def is_fixture(name: str) -> bool:
    return name in FIXTURES


def fixture_path(name: str, seed: int = 0) -> Path:
    return fixtures_home() / f"{name}-v{FIXTURE_VERSION}-s{seed}"


def ensure_fixture(name: str, seed: int = 0) -> Path:
    """Build once; later calls reuse the folder. Written to a temp dir, then renamed (atomic)."""

    out = fixture_path(name, seed)
    if (out / "crossengine-fixture.json").exists():  # written last: a finished build
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a build is one line of output, not a progress bar per shard
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        FIXTURES[name](tmp, seed)
        (tmp / "crossengine-fixture.json").write_text(json.dumps({"name": name, "seed": seed, "version": FIXTURE_VERSION}))
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
