"""`tiny-molmo`, HF port's processor: text with `<image>` placeholders plus images -> model inputs.

Each `<image>` becomes `<img_start>`, `tokens_per_image` x `<img_patch>`, `<img_end>`. Pixels
are rescaled and normalised here, in float32 on the CPU, by the checkpoint's image processor
(the training code sends uint8 and normalises inside the model). `token_type_ids` marks the
image patches (1), which switches the HF port's attention over them to bidirectional.
"""

import numpy as np
from transformers import BatchFeature, ProcessorMixin

IMAGE_PLACEHOLDER = "<image>"


class TinyMolmoProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, tokens_per_image=4, **kwargs):
        self.tokens_per_image = tokens_per_image
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text=None, images=None, return_tensors=None, add_special_tokens=True, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        per_text = images if images is not None else [[] for _ in texts]
        if per_text and not isinstance(per_text[0], (list, tuple)):
            per_text = [per_text]
        expansion = "<img_start>" + "<img_patch>" * self.tokens_per_image + "<img_end>"
        ids, type_ids, pixels = [], [], []
        patch_id = self.tokenizer.convert_tokens_to_ids("<img_patch>")
        for t, imgs in zip(texts, per_text):
            if t.count(IMAGE_PLACEHOLDER) != len(imgs):
                raise ValueError(f"{t.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders for {len(imgs)} images")
            row = self.tokenizer(t.replace(IMAGE_PLACEHOLDER, expansion), add_special_tokens=add_special_tokens)["input_ids"]
            ids.append(row)
            type_ids.append([int(i == patch_id) for i in row])
            if imgs:
                pixels.append(self.image_processor(list(imgs), return_tensors="np")["pixel_values"])
        data = {"input_ids": np.asarray(ids, dtype=np.int64), "token_type_ids": np.asarray(type_ids, dtype=np.int64)}
        if pixels:
            data["pixel_values"] = np.concatenate(pixels).astype(np.float32)
        return BatchFeature(data=data, tensor_type=return_tensors)
