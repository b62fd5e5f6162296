"""Config of `tiny-molmo`'s HF port, a remote-code fixture (loaded with trust_remote_code=True).

Sizes of the language model follow the other text fixtures (head_dim 64, GQA); the vision
tower cuts a 32x32 image into 16 patches of 8x8 and pools them 2x2 into 4 image tokens.
"""

from transformers import PretrainedConfig


class TinyMolmoConfig(PretrainedConfig):
    model_type = "tinymolmo"

    def __init__(
        self,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        vision_config=None,
        image_patch_token_id=None,
        image_start_token_id=None,
        image_end_token_id=None,
        tokens_per_image=4,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        # a plain dict: image_size, patch_size, hidden_size, intermediate_size, pool
        self.vision_config = vision_config or {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "pool": 2}
        self.image_patch_token_id = image_patch_token_id
        self.image_token_id = image_patch_token_id  # the name crossengine reads to tag image positions
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.tokens_per_image = tokens_per_image
        super().__init__(**kwargs)
