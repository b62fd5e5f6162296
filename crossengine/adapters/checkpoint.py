"""What a checkpoint or a LoRA adapter says about itself, read from its files without loading it.

Why without loading: the plan and preflight need the vocabulary size, the model type and an
adapter's rank before any engine starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def config_fields(model_path: str, revision: str | None = None) -> dict | None:
    """A checkpoint's config.json as plain fields (no model code runs), or None where it does not read."""
    try:
        from transformers import PretrainedConfig

        fields, _ = PretrainedConfig.get_config_dict(model_path, revision=revision)
    except Exception:  # noqa: BLE001 - a hub id offline, a tokenizer-only folder, files only an engine's environment reads
        return None
    return fields


def vocab_size_of(model_path: str, revision: str | None = None) -> int | None:
    """The vocabulary size in a checkpoint's config.json (text_config first), or None where it does not read."""
    fields = config_fields(model_path, revision) or {}
    v = (fields.get("text_config") or {}).get("vocab_size") or fields.get("vocab_size")
    return int(v) if v else None


def lora_info(path: str, merged: bool = False) -> dict[str, Any]:
    """What run.json records of a LoRA adapter: where, rank, alpha, targets, a content hash."""

    folder = Path(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    h = hashlib.sha256()
    for f in sorted(folder.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {
        "path": str(folder),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "sha256": h.hexdigest()[:16],
        "merged": merged,
    }


def model_is_dense(config: dict[str, Any]) -> bool:
    """Whether a model's config.json describes a dense model: no field counting experts above 1
    (num_experts, num_local_experts, n_routed_experts, moe_num_experts, ... in the text config too)."""
    fields = {**config, **(config.get("text_config") or {})}
    return not any("expert" in k and isinstance(v, int) and not isinstance(v, bool) and v > 1 for k, v in fields.items())
