"""A sample's chat messages rendered to text by a template (the engine's own, or a file).

Why apart from the interface: only engines that take chat samples need it, and input
parity compares what each engine rendered.
"""

from __future__ import annotations

from pathlib import Path

from crossengine.adapters.base import RawSample, SampleError


def render_chat(renderer, sample: RawSample, template_path: str | None, engine: str) -> tuple[str, list[str]]:
    """Chat turns as the prompt text this engine's template makes, and the image files in order.

    `renderer` is a tokenizer or processor with `apply_chat_template` (`template_path`, the
    engine's `chat_template`, replaces the model's own), or a native engine's `chat_format`
    function, called with the turns. Image parts become `{"type": "image"}`,
    where the template writes its placeholder."""

    images: list[str] = []
    turns = []
    for m in sample.messages or []:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image":
                    images.append(part["path"])
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        turns.append({"role": m["role"], "content": content})
    if not hasattr(renderer, "apply_chat_template"):  # a native engine's chat_format: the training code's own rendering
        return str(renderer(turns)), images
    template = Path(template_path).read_text() if template_path else None
    if template is None and not getattr(renderer, "chat_template", None):
        raise SampleError(sample.id, f"the model of engine {engine!r} has no chat template; give the engine chat_template: PATH (a Jinja file)")
    return renderer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False, chat_template=template), images
