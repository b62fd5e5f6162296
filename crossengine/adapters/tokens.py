"""What each position of a prepared sample is: its modality, its attention, a valid token id.

Why here: every engine codes its positions the same way (crossengine/columns.py), so the
token table can split metrics by modality and attention whichever engine scored them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from crossengine.adapters.base import Sample, SampleError
from crossengine.columns import ATTENTIONS, MODALITIES

# Model types whose HF code lets each image's tokens attend to each other when token_type_ids
# marks them (tinymolmo: the Molmo-style fixture's HF port, which copies Gemma3's choice).
BIDIRECTIONAL_IMAGE_SPANS = ("gemma3", "gemma3n", "gemma4", "tinymolmo")


def mask_kinds(model_type: str, input_ids: np.ndarray, model_inputs: dict[str, Any]) -> np.ndarray:
    """Which positions the model's own mask lets attend bidirectionally: image spans, or PaliGemma's prefix.

    Gemma3 (and the types beside it) makes each image span bidirectional only when token_type_ids reaches the model;
    PaliGemma makes the whole prefix (token_type_ids == 0) bidirectional.
    """
    kinds = np.zeros(len(input_ids), dtype=np.int8)
    tti = model_inputs.get("token_type_ids")
    if tti is not None:
        tti = np.asarray(tti).reshape(-1)[: len(input_ids)]
        if model_type in BIDIRECTIONAL_IMAGE_SPANS:
            kinds[tti == 1] = ATTENTIONS.index("bidirectional")
        elif model_type == "paligemma":
            kinds[tti == 0] = ATTENTIONS.index("bidirectional")
    return kinds


def text_modality(ids: np.ndarray, special_ids, image_token_id: int | None) -> np.ndarray:
    """text | image | special per position, from the reference tokenizer's special ids."""
    out = np.zeros(len(ids), dtype=np.int8)
    out[np.isin(ids, np.asarray(sorted(set(special_ids)), dtype=np.int64))] = MODALITIES.index("special")
    if image_token_id is not None:
        out[ids == image_token_id] = MODALITIES.index("image")
    return out


def vocab_error(sample: Sample, vocab_size: int, engine: str) -> SampleError | None:
    """The one check that a sample's ids fit an engine's vocabulary (hf, native and vllm use it)."""
    top = int(sample.input_ids.max())
    return SampleError(sample.sample_id, f"token id {top} >= vocab size {vocab_size} of engine {engine!r}") if top >= vocab_size else None


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of a tokenizer's vocabulary and special tokens: equal ids need equal tokenizers."""

    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, sorted(tokenizer.all_special_tokens)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
