"""`tiny-remote`: one attention layer whose rotary frequencies are a non-persistent buffer.

The buffer is computed in __init__ and never saved (persistent=False), the pattern many
remote-code models use. A loader that builds the model on the meta device and fills in
only the checkpoint's tensors leaves it uninitialised; crossengine's buffer audit exists
to catch exactly that.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinyrope import TinyRopeConfig


class Rotary(nn.Module):
    def __init__(self, dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        t = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        freqs = t[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class TinyRopeForCausalLM(PreTrainedModel):
    config_class = TinyRopeConfig
    base_model_prefix = "tinyrope"

    def __init__(self, config: TinyRopeConfig):
        super().__init__(config)
        h, n = config.hidden_size, config.num_attention_heads
        self.heads, self.head_dim = n, h // n
        self.embed = nn.Embedding(config.vocab_size, h)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)
        self.rotary = Rotary(self.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.1)

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q), self.rotary(k)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, h))
        return CausalLMOutput(logits=self.lm_head(x))
