"""Chat samples (`messages` rendered by the engine's chat template, or `chat_template: PATH`) and
input parity (`inputs: own`: a candidate's own inputs compared with the reference's)."""

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


QWEN = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"

OWN = """\
model: tiny-text
reference: a
engines:
  a: {type: hf, chat_template: user.jinja}
  qwen: {type: hf, inputs: own, chat_template: qwen.jinja}
  same: {type: hf, inputs: own, chat_template: user.jinja, attn_implementation: eager}
samples:
  - id: chat
    messages:
      - {role: user, content: "The quick brown fox"}
      - {role: assistant, content: "jumps over the lazy dog"}
"""


def test_own_inputs_find_a_template_mismatch_at_its_first_token(ray_cluster, chat_experiment, tmp_path):
    from transformers import AutoTokenizer

    from crossengine.fixtures import ensure_fixture

    (tmp_path / "qwen.jinja").write_text(QWEN)
    run_dir, runner = run_experiment(chat_experiment(OWN), tmp_path / "results")
    assert not runner.errors, runner.errors
    inputs = pd.read_parquet(run_dir / "inputs").set_index(["cand_engine", "input"])
    tok = AutoTokenizer.from_pretrained(ensure_fixture("tiny-text"))
    ref_text = "User: The quick brown fox\nAssistant: jumps over the lazy dog\n"
    cand_text = "<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\njumps over the lazy dog<|im_end|>\n"
    a = tok(ref_text, add_special_tokens=False).input_ids
    b = tok(cand_text, add_special_tokens=False).input_ids
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    row = inputs.loc[("qwen", "input_ids")]
    assert row["status"] == "differs" and row["first_difference"] == first
    assert (row["ref_token"], row["cand_token"]) == (tok.decode([a[first]]), tok.decode([b[first]]))
    assert "User: The quick" in row["ref_context"] and "<|im_start|>user" in row["cand_context"]
    assert row["scored"] == "reference_text", "different ids: scored on the reference's rendered prompt, tokenised by the candidate"
    same = inputs.loc[("same", "input_ids")]
    assert same["status"] == "equal" and same["scored"] == "own"
    tokens = pd.read_parquet(run_dir / "tokens")
    assert (tokens[tokens["cand_engine"] == "qwen"]["token_id"].tolist() == a[1:]), "qwen was scored on the reference's ids"
    page = (run_dir / "report.html").read_text()
    assert "<h2>Inputs</h2>" in page and f"token ids differ at position {first}" in page, "the report leads with the input difference"


def test_an_input_present_on_one_side_only_is_reported_by_name(ray_cluster, write_experiment, tmp_path):
    text = f"""\
model: tiny-vision
reference: a
engines:
  a: {{type: hf}}
  causal: {{type: hf, inputs: own, drop_inputs: [token_type_ids]}}
samples:
  - {{id: look, text: "Look <start_of_image> here", images: [{EXPERIMENTS / "data" / "gradient.png"}]}}
"""
    run_dir, runner = run_experiment(write_experiment(text), tmp_path / "results")
    assert not runner.errors, runner.errors
    inputs = pd.read_parquet(run_dir / "inputs").set_index("input")
    assert inputs.loc["token_type_ids", "status"] == "reference only"
    assert inputs.loc["input_ids", "status"] == "equal" and inputs.loc["input_ids", "scored"] == "own"
    assert inputs.loc["pixel_values", "status"] == "equal" and inputs.loc["pixel_values", "max_abs_diff"] == 0


def test_pixels_normalised_elsewhere_are_found_with_their_difference(ray_cluster, write_experiment, tmp_path):
    """The seed case: the HF processor normalises in float32 on the CPU, the native code sends uint8
    and normalises on the device in the model's dtype (here the pixels_on_device patch, bf16)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from crossengine.fixtures import ensure_fixture

    image = EXPERIMENTS / "data" / "gradient.png"
    text = f"""\
model: tiny-vision
reference: a
engines:
  a: {{type: hf}}
  device: {{type: hf, inputs: own, patches: [pixels_on_device], dtype: bfloat16}}
samples:
  - {{id: look, text: "Look <start_of_image> here", images: [{image}]}}
"""
    run_dir, runner = run_experiment(write_experiment(text), tmp_path / "results")
    assert not runner.errors, runner.errors
    row = pd.read_parquet(run_dir / "inputs").set_index("input").loc["pixel_values"]
    ip = AutoProcessor.from_pretrained(ensure_fixture("tiny-vision")).image_processor
    pil = [Image.open(image).convert("RGB")]
    cpu = ip(pil, return_tensors="np")["pixel_values"].astype(np.float64)  # float32 on the CPU, as the reference
    raw = torch.as_tensor(ip(pil, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"].round()).to(torch.bfloat16)
    mean, std = (torch.tensor(v, dtype=torch.bfloat16)[:, None, None] for v in (ip.image_mean, ip.image_std))
    device = ((raw * ip.rescale_factor - mean) / std).float().numpy().astype(np.float64)
    want = np.abs(cpu - device)
    assert row["status"] == "differs" and want.max() > 1e-3
    assert row["max_abs_diff"] == pytest.approx(want.max(), rel=1e-6) and row["mean_abs_diff"] == pytest.approx(want.mean(), rel=1e-6)


def test_a_native_chat_format_renders_like_the_equivalent_template(ray_cluster, chat_experiment, tmp_path):
    """chat_format: the training code's own rendering (here "User: …" lines); with inputs: own its ids
    must equal the reference's, rendered by the equivalent Jinja template (tiny-text has no template of
    its own, so an ignored chat_format would fail to render)."""
    text = OWN.replace(
        "  qwen: {type: hf, inputs: own, chat_template: qwen.jinja}\n",
        "  native: {type: native, factory: 'tests.native_factories:hf_as_native', chat_format: 'tests.native_factories:user_assistant', inputs: own}\n",
    )
    run_dir, runner = run_experiment(chat_experiment(text), tmp_path / "results")
    assert not runner.errors, runner.errors
    rows = pd.read_parquet(run_dir / "inputs").set_index(["cand_engine", "input"])
    assert rows.loc[("native", "input_ids"), "status"] == "equal" and rows.loc[("native", "input_ids"), "scored"] == "own"
