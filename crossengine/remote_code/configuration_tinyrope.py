"""Config of `tiny-remote`, a remote-code fixture (loaded with trust_remote_code=True)."""

from transformers import PretrainedConfig


class TinyRopeConfig(PretrainedConfig):
    model_type = "tinyrope"

    def __init__(self, vocab_size=512, hidden_size=128, num_attention_heads=2, rope_theta=10000.0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        super().__init__(**kwargs)
