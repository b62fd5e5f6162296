"""Chat samples: `messages` rendered by the engine's chat template (its own, or `chat_template: PATH`)."""

from __future__ import annotations

import pandas as pd
import pytest

from .conftest import EXPERIMENTS, run_experiment

# A "User: … / Assistant: …" template, the format of many native training codes. (HF renders
# templates with trim_blocks: a newline must be written as an expression, not after a tag.)
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
)

TEXT_CHAT = """\
model: tiny-text
reference: a
engines:
  a: {type: hf, chat_template: user.jinja}
  b: {type: hf, attn_implementation: eager}
samples:
  - id: chat
    messages:
      - {role: user, content: "The quick brown fox"}
      - {role: assistant, content: "jumps over the lazy dog"}
  - id: plain
    text: "The quick brown fox"
"""


@pytest.fixture
def chat_experiment(write_experiment, tmp_path):
    (tmp_path / "user.jinja").write_text(TEMPLATE)
    return write_experiment


def test_messages_are_rendered_with_the_engines_chat_template(ray_cluster, chat_experiment, tmp_path):
    from transformers import AutoTokenizer

    from crossengine.fixtures import ensure_fixture

    run_dir, runner = run_experiment(chat_experiment(TEXT_CHAT), tmp_path / "results")
    assert not runner.errors, runner.errors
    tokens = pd.read_parquet(run_dir / "tokens").sort_values(["sample_id", "position"])
    tok = AutoTokenizer.from_pretrained(ensure_fixture("tiny-text"))
    rendered = "User: The quick brown fox\nAssistant: jumps over the lazy dog\n"  # the template, written out by hand
    want = tok(rendered, add_special_tokens=False).input_ids  # the template writes any BOS itself
    got = tokens[tokens["sample_id"] == "chat"]["token_id"].tolist()
    assert got == want[1:], "positions 1.. are the rendered chat's tokens"
    plain = tokens[tokens["sample_id"] == "plain"]["token_id"].tolist()
    assert plain == tok("The quick brown fox").input_ids[1:], "text samples are unchanged"


def test_image_parts_go_where_the_template_puts_them(ray_cluster, chat_experiment, tmp_path):
    image = EXPERIMENTS / "data" / "gradient.png"
    text = f"""\
model: tiny-vision
reference: a
engines:
  a: {{type: hf, chat_template: user.jinja}}
  b: {{type: hf, attn_implementation: eager}}
samples:
  - id: chat
    messages:
      - role: user
        content: [{{type: text, text: "Look "}}, {{type: image, path: {image}}}, {{type: text, text: " here"}}]
  - id: same-as-text
    text: "User: Look <start_of_image> here"
    images: [{image}]
"""
    run_dir, runner = run_experiment(chat_experiment(text), tmp_path / "results")
    assert not runner.errors, runner.errors
    tokens = pd.read_parquet(run_dir / "tokens")
    image_rows = tokens[tokens["modality"].astype(str) == "image"].groupby("sample_id").size()
    assert image_rows.get("chat", 0) > 0, "the image part was expanded into image tokens"
    assert image_rows["chat"] == image_rows["same-as-text"]


def test_a_model_without_a_chat_template_is_a_per_sample_error(ray_cluster, write_experiment, tmp_path):
    text = TEXT_CHAT.replace(", chat_template: user.jinja", "")
    run_dir, runner = run_experiment(write_experiment(text), tmp_path / "results")
    errors = {e["sample_id"]: e["error"] for e in runner.errors}
    assert "no chat template" in errors["chat"] and "chat_template: PATH" in errors["chat"], errors
    assert set(pd.read_parquet(run_dir / "tokens")["sample_id"]) == {"plain"}, "the other sample still runs"
