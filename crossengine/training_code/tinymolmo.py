"""`tiny-molmo`'s training code: the native implementation of the weights the HF port loads.

    native: {type: native, factory: "crossengine.training_code.tinymolmo:build",
             preprocess: "crossengine.training_code.tinymolmo:preprocess",
             chat_format: "crossengine.training_code.tinymolmo:chat_format"}

Written the way Molmo's own code differs from its HF port, so that crossengine has
something real to find:

- prompts are "User: … / Assistant: …" lines after `<bos>` (the port's template is Qwen-style);
- `preprocess` returns uint8 `images` cut into patches (row-major, channels last),
  `image_input_idx` (where each image's features go) and `image_masks` (the valid fraction of
  each patch); pixels are rescaled and normalised inside the model, in the model's dtype;
- attention is causal everywhere, image tokens included;
- module names are its own (fused `att_proj` and `ff_proj`, `blocks`, `wte`), and the HF
  checkpoint is converted on load, as training code converts a published checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# The normalisation constants the training code hard-codes (OpenAI CLIP's, as Molmo's).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, PATCH, POOL = 32, 8, 2
PLACEHOLDER = "<image>"


def chat_format(turns) -> str:
    """`<bos>User: …\\nAssistant: …\\n`; an image part is written as `<image>` where it stands."""
    out = ["<bos>"]
    for turn in turns:
        content = turn["content"]
        if not isinstance(content, str):
            content = "".join(PLACEHOLDER if p["type"] == "image" else p["text"] for p in content)
        out.append(f"{turn['role'].capitalize()}: {content}\n")
    return "".join(out)


def preprocess(text: str, images: list, engine, add_special_tokens: bool = True) -> dict[str, np.ndarray]:
    """Token ids (each `<image>` expanded as the port's processor does) and uint8 image patches."""
    tok = engine.tokenizer
    per_image = (IMAGE_SIZE // PATCH // POOL) ** 2
    expansion = "<img_start>" + "<img_patch>" * per_image + "<img_end>"
    if text.count(PLACEHOLDER) != len(images):
        raise ValueError(f"{text.count(PLACEHOLDER)} {PLACEHOLDER} placeholders for {len(images)} images")
    ids = np.asarray(tok(text.replace(PLACEHOLDER, expansion), add_special_tokens=add_special_tokens)["input_ids"], dtype=np.int64)
    if not images:
        return {"input_ids": ids}
    side = IMAGE_SIZE // PATCH
    patches = []
    for image in images:
        a = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), resample=3), dtype=np.uint8)  # bicubic
        patches.append(a.reshape(side, PATCH, side, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(side * side, PATCH * PATCH * 3))
    slots = np.flatnonzero(ids == tok.convert_tokens_to_ids("<img_patch>")).reshape(len(images), per_image)
    return {
        "input_ids": ids,
        "images": np.stack(patches),  # uint8 [n, 16, 192]
        "image_input_idx": slots.astype(np.int64),  # [n, 4]
        "image_masks": np.ones((len(images), side * side), dtype=np.float32),  # whole images: every patch valid
    }


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.att_proj = nn.Linear(d, q + 2 * kv, bias=False)
        self.attn_out = nn.Linear(q, d, bias=False)
        self.ff_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.ff_proj = nn.Linear(d, 2 * c.intermediate_size, bias=False)
        self.ff_out = nn.Linear(c.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split([self.heads * self.head_dim, *(2 * [self.kv_heads * self.head_dim])], dim=-1)
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.ff_proj(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class ImageVit(nn.Module):
    """One pre-norm block over the patches, then a 2x2 mean pool and a two-layer projector."""

    def __init__(self, vc, out_dim):
        super().__init__()
        d = vc["hidden_size"]
        self.patch_embedding = nn.Linear(3 * PATCH * PATCH, d)
        self.positional_embedding = nn.Parameter(torch.zeros((IMAGE_SIZE // PATCH) ** 2, d))
        self.pad_embed = nn.Parameter(torch.zeros(d))  # added where image_masks says a patch is padding
        self.ln_1, self.ln_2, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.w1, self.w2 = nn.Linear(d, vc["intermediate_size"]), nn.Linear(vc["intermediate_size"], d)
        self.projector = nn.Sequential(nn.Linear(d, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, pixels, masks):  # pixels [n, 16, 192] normalised, channels last
        x = self.patch_embedding(pixels) + self.positional_embedding + self.pad_embed * (1 - masks)[..., None].to(pixels.dtype)
        h = self.ln_1(x)
        x = x + self.wo(F.scaled_dot_product_attention(self.wq(h), self.wk(h), self.wv(h)))
        x = self.ln_post(x + self.w2(F.gelu(self.w1(self.ln_2(x)))))
        side = IMAGE_SIZE // PATCH
        x = x.view(-1, side // POOL, POOL, side // POOL, POOL, x.shape[-1]).mean(dim=(2, 4)).flatten(1, 2)
        return self.projector(x)


class TinyMolmo(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.vision_backbone = ImageVit(c.vision_config, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.ln_f = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.ff_out = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.head_dim, self.theta = c.head_dim, c.rope_theta

    def normalise(self, images):
        """uint8 -> the model's dtype, rescaled and normalised on the model's device."""
        dtype = self.wte.weight.dtype
        mean = torch.tensor(MEAN, device=images.device, dtype=dtype).repeat(PATCH * PATCH)
        std = torch.tensor(STD, device=images.device, dtype=dtype).repeat(PATCH * PATCH)
        return (images.to(dtype) * (1 / 255) - mean) / std

    def input_view(self, images=None, image_input_idx=None, image_masks=None, **other):
        """The pixels as this model normalises them, laid out as the HF port's `pixel_values`
        [n, 3, H, W] so crossengine can compare the two by name; image positions are compared
        through the token ids."""
        if images is None:
            return {}
        side = IMAGE_SIZE // PATCH
        x = self.normalise(images).view(-1, side, side, PATCH, PATCH, 3)
        return {"pixel_values": x.permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)}

    def forward(self, input_ids, images=None, image_input_idx=None, image_masks=None):
        x = self.wte(input_ids)
        if images is not None:
            features = self.vision_backbone(self.normalise(images), image_masks)
            flat = x.view(-1, x.shape[-1]).clone()
            flat[image_input_idx.reshape(-1)] += features.reshape(-1, x.shape[-1])
            x = flat.view_as(x)
        t = input_ids.shape[-1]
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim))
        angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.ff_out(self.ln_f(x))


def convert_from_hf(state: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:
    """The HF port's state dict in this code's names: fused projections, channels-last patches."""
    out = {"wte.weight": state["model.embed_tokens.weight"], "ln_f.weight": state["model.norm.weight"], "ff_out.weight": state["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"blocks.{i}.att_proj.weight"] = torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"blocks.{i}.attn_out.weight"] = state[p + "self_attn.o_proj.weight"]
        out[f"blocks.{i}.ff_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[f"blocks.{i}.ff_proj.weight"] = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        out[f"blocks.{i}.ff_out.weight"] = state[p + "mlp.down_proj.weight"]
    v, n = "model.vision.", "vision_backbone."
    w = state[v + "patch_embed.weight"]  # columns (c, ph, pw) -> (ph, pw, c)
    out[n + "patch_embedding.weight"] = w.view(w.shape[0], 3, PATCH, PATCH).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    out[n + "patch_embedding.bias"] = state[v + "patch_embed.bias"]
    out[n + "positional_embedding"] = state[v + "pos_embed"]
    out[n + "pad_embed"] = torch.zeros_like(state[v + "pos_embed"][0])  # the port has none: it never pads
    renames = {
        "block.layer_norm1": "ln_1",
        "block.layer_norm2": "ln_2",
        "post_layernorm": "ln_post",
        "block.q_proj": "wq",
        "block.k_proj": "wk",
        "block.v_proj": "wv",
        "block.out_proj": "wo",
        "block.fc1": "w1",
        "block.fc2": "w2",
        "proj_in": "projector.0",
        "proj_out": "projector.2",
    }
    for hf, mine in renames.items():
        for kind in ("weight", "bias"):
            out[f"{n}{mine}.{kind}"] = state[f"{v}{hf}.{kind}"]
    return out


def build(model_path, config, device, dtype):
    """The factory: build the training code's model and load the HF checkpoint through the converter."""
    from safetensors.torch import load_file

    model = TinyMolmo(config)
    model.load_state_dict(convert_from_hf(load_file(str(Path(model_path) / "model.safetensors")), config), strict=True)
    return model.to(device=device, dtype=dtype).eval()
