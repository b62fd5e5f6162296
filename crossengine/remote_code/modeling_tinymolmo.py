"""`tiny-molmo`, HF port: a Molmo-style vision-language model as a transformers remote-code model.

It reproduces the choices of a real HF port that differ from the model's training code
(crossengine/training_code/tinymolmo.py, same weights):

- it takes `pixel_values` that the processor rescaled and normalised in float32 on the CPU;
- when `token_type_ids` reaches it, the tokens of each image attend to each other
  bidirectionally (as HF's Gemma3 does); the training code is causal everywhere.

Image features are added to the embeddings of the `<img_patch>` tokens, in order.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinymolmo import TinyMolmoConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionBlock(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, inner), nn.Linear(inner, d)

    def forward(self, x):
        h = self.layer_norm1(x)
        y = F.scaled_dot_product_attention(self.q_proj(h)[:, None], self.k_proj(h)[:, None], self.v_proj(h)[:, None])[:, 0]
        x = x + self.out_proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x))))


class VisionTower(nn.Module):
    """Patches (channel-major, as HF image processors lay pixels out) -> one block -> 2x2 mean pool."""

    def __init__(self, vc, out_dim):
        super().__init__()
        d, p, side = vc["hidden_size"], vc["patch_size"], vc["image_size"] // vc["patch_size"]
        self.patch, self.side, self.pool = p, side, vc["pool"]
        self.patch_embed = nn.Linear(3 * p * p, d)
        self.pos_embed = nn.Parameter(torch.zeros(side * side, d))
        self.block = VisionBlock(d, vc["intermediate_size"])
        self.post_layernorm = nn.LayerNorm(d)
        self.proj_in, self.proj_out = nn.Linear(d, out_dim), nn.Linear(out_dim, out_dim)

    def forward(self, pixel_values):  # [n, 3, H, W], normalised
        n, p, s, k = pixel_values.shape[0], self.patch, self.side, self.pool
        x = pixel_values.unfold(2, p, p).unfold(3, p, p)  # [n, 3, s, s, p, p]
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(n, s * s, 3 * p * p)
        x = self.post_layernorm(self.block(self.patch_embed(x) + self.pos_embed))
        x = x.view(n, s // k, k, s // k, k, -1).mean(dim=(2, 4)).reshape(n, (s // k) ** 2, -1)
        return self.proj_out(F.gelu(self.proj_in(x)))


class TinyMolmoModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision = VisionTower(config.vision_config, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class TinyMolmoForConditionalGeneration(PreTrainedModel):
    config_class = TinyMolmoConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: TinyMolmoConfig):
        super().__init__(config)
        self.model = TinyMolmoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.1)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, VisionTower):
            module.pos_embed.data.normal_(0.0, 0.1)
        elif isinstance(module, TinyMolmoModel):
            t = self.config.head_dim
            module.inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, t, 2, dtype=torch.float32) / t))

    def _mask(self, token_type_ids, t, device):
        """Causal, plus both directions within each image's run of token_type_ids == 1."""
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        if token_type_ids is None:
            return None
        is_image = token_type_ids[0, :t].bool()
        starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
        span = torch.where(is_image, torch.cumsum(starts.int(), 0), 0)
        same = (span[:, None] == span[None, :]) & is_image[:, None] & is_image[None, :]
        return (causal | same)[None, None]

    def forward(self, input_ids, pixel_values=None, token_type_ids=None, **kwargs):
        m = self.model
        x = m.embed_tokens(input_ids)
        if pixel_values is not None:
            features = m.vision(pixel_values.to(x.dtype)).reshape(-1, x.shape[-1])
            slots = input_ids == self.config.image_patch_token_id
            x = x.masked_scatter(slots[..., None], x[slots] + features)
        t = input_ids.shape[1]
        pos = torch.arange(t, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, m.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = self._mask(token_type_ids, t, x.device)
        for layer in m.layers:
            x = layer(x, cos, sin, mask)
        return CausalLMOutput(logits=self.lm_head(m.norm(x)))
