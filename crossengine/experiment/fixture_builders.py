"""How each tiny fixture model is made: a config, seeded random weights, a trained byte-level tokenizer.

Why apart from the registry (crossengine/experiment/fixtures.py): the registry is what the plan
reads (is this name a fixture, where is it); these builders run once per machine and import the
model classes they build. The fixtures derived from others (LoRA adapters, drifted checkpoints)
stay with the registry, since they build their base first.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from importlib import import_module
from pathlib import Path

# A few sentences are enough to learn a few hundred merges; the text itself is ours.
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the engines compare their numbers.
A model that is ported from one library to another should give the same log-probabilities.
When two engines disagree, the engineer wants to know which token, which layer and which buffer.
Images are cut into patches, projected, and placed between the start and the end of image tokens.
Reinforcement learning samples tokens with one engine and scores them with another one.
Small differences in attention masks, rotary frequencies or data types add up over many layers.
In the morning the river was calm, and in the evening the wind came down from the hills.
Numbers are computed, never typed in; every metric is checked against an independent computation.
"""


_NEWLINE_RUNS = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]  # Gemma's processor emits "\n\n" around images


def _train_tokenizer(vocab_size: int, special: list[str]):
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in _NEWLINE_RUNS])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return tok


def fast_tokenizer(special: list[str], vocab_size: int, **extra):
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(vocab_size, special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", **extra)


def save_tokenizer(tokenizer, out: Path) -> None:
    """Save so that transformers 4.x loads it too (5.x writes the 5-only class TokenizersBackend)."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _sharpen_attention(model, factor: float = 3.0) -> None:
    """Scale Q/K projections so random attention is peaked, not uniform (a uniform mask hides bugs)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)


# Shared by the text fixtures: head_dim 64 (vLLM-CPU's kernels need one of a few sizes), GQA.
_TEXT_SIZES = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def _build_causal_lm(out: Path, seed: int, config_cls, model_cls, **extra) -> None:
    tokenizer = fast_tokenizer(["<pad>", "<bos>", "<eos>"], vocab_size=508)
    config = config_cls(
        **{**_TEXT_SIZES, **extra},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    seed_all(seed)
    model = model_cls(config).eval()
    _sharpen_attention(model)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)


def build_tiny_text(out: Path, seed: int) -> None:
    """Llama family: head_dim 64, GQA, vocab 512, weights large enough for peaked attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _build_causal_lm(out, seed, LlamaConfig, LlamaForCausalLM, head_dim=64)


def build_tiny_text_32k(out: Path, seed: int) -> None:
    """tiny-text at a real vocabulary size (32,000, Llama 2's): the same byte-level tokenizer (its 508 ids are the
    text's), the rest of the vocabulary reachable by token ids; what full-vocabulary paths cost at a real width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _build_causal_lm(out, seed, LlamaConfig, LlamaForCausalLM, head_dim=64, vocab_size=32_000, max_position_embeddings=2048)


def build_logits_heavy(out: Path, vocab_size: int, max_position_embeddings: int, seed: int = 0) -> Path:
    """A one-layer Llama with a 64-wide hidden state and a large vocabulary: logits dominate its memory, so
    what holds or moves them (the logits budget, the transports) is what a run of it measures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast_tokenizer(["<pad>", "<bos>", "<eos>"], vocab_size=508).save_pretrained(out)
    return out


_MOE = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts_per_tok=2)  # head_dim 32: vLLM-CPU runs it


def build_tiny_moe(out: Path, seed: int) -> None:
    """Qwen3-MoE family: 8 experts, top-2 (normalised), a router in every layer; head_dim 32."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    _build_causal_lm(out, seed, Qwen3MoeConfig, Qwen3MoeForCausalLM, num_experts=8, moe_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=True, **_MOE)


def build_tiny_mixtral(out: Path, seed: int) -> None:
    """Mixtral family: 8 local experts, top-2; head_dim 32."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _build_causal_lm(out, seed, MixtralConfig, MixtralForCausalLM, num_local_experts=8, **_MOE)


def build_tiny_olmo2(out: Path, seed: int) -> None:
    """OLMo-2 (post-norm blocks, QK-norm): loadable by HF, vLLM and OLMo-core's converter."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    _build_causal_lm(out, seed, Olmo2Config, Olmo2ForCausalLM, rms_norm_eps=1e-6)


class _RemoteCode:
    """Copy remote-code files into a checkpoint folder and import them as the package
    transformers' dynamic loader will make of it; forgotten again on exit."""

    def __init__(self, out: Path, files: list[str]):
        self.out, self.files, self.pkg = out, files, f"crossengine_build_{out.name.strip('.').replace('-', '_')}"

    def __enter__(self):

        code = Path(__file__).parent.parent / "remote_code"  # crossengine/remote_code: data, shipped as package data
        for f in self.files:
            shutil.copy(code / f, self.out / f)
        init = self.out / "__init__.py"
        init.write_text("")
        spec = importlib.util.spec_from_file_location(self.pkg, init, submodule_search_locations=[str(self.out)])
        sys.modules[self.pkg] = importlib.util.module_from_spec(spec)
        modules = [import_module(f"{self.pkg}.{f.removesuffix('.py')}") for f in self.files]
        init.unlink()
        return modules

    def __exit__(self, *exc):

        for name in list(sys.modules):
            if name.startswith(self.pkg):
                del sys.modules[name]


def build_tiny_remote(out: Path, seed: int) -> None:
    """A remote-code model (trust_remote_code) with a non-persistent rotary buffer."""
    with _RemoteCode(out, ["configuration_tinyrope.py", "modeling_tinyrope.py"]) as (cfg_mod, model_mod):
        tokenizer = fast_tokenizer(["<pad>", "<bos>", "<eos>"], vocab_size=508)
        config = cfg_mod.TinyRopeConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            auto_map={"AutoConfig": "configuration_tinyrope.TinyRopeConfig", "AutoModelForCausalLM": "modeling_tinyrope.TinyRopeForCausalLM"},
        )
        seed_all(seed)
        model = model_mod.TinyRopeForCausalLM(config).eval()
        model.save_pretrained(out)
        config.save_pretrained(out)
        save_tokenizer(tokenizer, out)


# The HF port's chat template: Qwen-style turns; an image part becomes the processor's <image>.
_GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


_MOLMO_SPECIAL = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<img_start>", "<img_patch>", "<img_end>"]


def build_tiny_molmo(out: Path, seed: int) -> None:
    """A Molmo-style VLM as an HF remote-code port; crossengine/training_code/tinymolmo.py is the
    native implementation of the same weights (see both docstrings for how they differ)."""
    import torch
    from transformers import CLIPImageProcessorPil

    files = ["configuration_tinymolmo.py", "modeling_tinymolmo.py", "processing_tinymolmo.py"]
    with _RemoteCode(out, files) as (cfg_mod, model_mod, proc_mod):
        tokenizer = fast_tokenizer(_MOLMO_SPECIAL, vocab_size=508)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _MOLMO_SPECIAL}
        config = cfg_mod.TinyMolmoConfig(
            **{k: v for k, v in _TEXT_SIZES.items() if k not in ("initializer_range", "tie_word_embeddings")},
            head_dim=64,
            image_patch_token_id=ids["<img_patch>"],
            image_start_token_id=ids["<img_start>"],
            image_end_token_id=ids["<img_end>"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            auto_map={"AutoConfig": "configuration_tinymolmo.TinyMolmoConfig", "AutoModelForImageTextToText": "modeling_tinymolmo.TinyMolmoForConditionalGeneration"},
        )
        seed_all(seed)
        model = model_mod.TinyMolmoForConditionalGeneration(config).eval()
        _sharpen_attention(model)
        with torch.no_grad():  # visible image features: the projector's output is added to token embeddings
            model.model.vision.proj_out.weight.mul_(3.0)
        model.save_pretrained(out)
        config.save_pretrained(out)
        image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
        processor = proc_mod.TinyMolmoProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE)
        processor.save_pretrained(out)
        save_tokenizer(tokenizer, out)
        for name in ("processor_config.json", "preprocessor_config.json"):  # what register_for_auto_class writes, which
            path = out / name  # would also copy the code onto itself
            if path.exists():
                cfg = json.loads(path.read_text())
                cfg["auto_map"] = {"AutoProcessor": "processing_tinymolmo.TinyMolmoProcessor"}
                path.write_text(json.dumps(cfg, indent=2))


def build_tiny_vision(out: Path, seed: int) -> None:
    """Gemma3 with a SigLIP tower: 4 image tokens per 32x32 image, head_dim 64 on both towers."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tokenizer = fast_tokenizer(
        _GEMMA3_SPECIAL,
        vocab_size=508,
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    tokens_per_image = 4
    config = Gemma3Config(
        text_config=dict(
            **{k: v for k, v in _TEXT_SIZES.items() if k != "tie_word_embeddings"},  # Gemma3 ties them
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=0.1,
        torch_dtype="float32",
    )
    seed_all(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _sharpen_attention(model)
    with torch.no_grad():  # random init leaves the projector's scale at zero
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    _write_canonical_gemma3_weights(model, out)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_image)
    processor.save_pretrained(out)


def _write_canonical_gemma3_weights(model, out: Path) -> None:
    """Rewrite weights in the hub's Gemma3 layout, which vLLM's loader expects: transformers 5 saves the vision tower as vision_tower.embeddings..., vLLM reads vision_tower.vision_model...."""
    from safetensors.torch import save_file

    renamed = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower.head") or name == "lm_head.weight":
            continue  # unused pooling head; lm_head is tied to the embeddings
        if name.startswith("model.vision_tower."):
            name = "vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
        elif name.startswith("model.language_model."):
            name = "language_model.model." + name.removeprefix("model.language_model.")
        elif name.startswith("model.multi_modal_projector."):
            name = name.removeprefix("model.")
        renamed[name] = tensor.contiguous()
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
