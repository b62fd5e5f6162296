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

# One run on tiny-text serves the text tests, one on tiny-vision the image tests (each run starts
# every engine once). a renders with the "User:" template; b is another engine on a's inputs; the
# others prepare their own: qwen with a Qwen-style template, same with a's template, native with
# the training code's chat_format (tiny-text has no template: an ignored chat_format fails to render).
TEXT = """\
model: tiny-text
reference: a
engines:
  a: {type: hf, chat_template: user.jinja}
  b: {type: hf, attn_implementation: eager}
  qwen: {type: hf, inputs: own, chat_template: qwen.jinja}
  same: {type: hf, inputs: own, chat_template: user.jinja, attn_implementation: eager}
  native: {type: native, factory: 'tests.native_factories:hf_as_native', chat_format: 'tests.native_factories:user_assistant', inputs: own}
samples:
  - id: chat
    messages:
      - {role: user, content: "The quick brown fox"}
      - {role: assistant, content: "jumps over the lazy dog"}
  - id: plain
    text: "The quick brown fox"
"""

QWEN = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
IMAGE = EXPERIMENTS / "data" / "gradient.png"

VISION = f"""\
model: tiny-vision
reference: a
engines:
  a: {{type: hf, chat_template: user.jinja}}
  b: {{type: hf, attn_implementation: eager}}
  causal: {{type: hf, inputs: own, chat_template: user.jinja, drop_inputs: [token_type_ids]}}
  device: {{type: hf, inputs: own, chat_template: user.jinja, patches: [pixels_on_device], dtype: bfloat16}}
samples:
  - id: chat
    messages:
      - role: user
        content: [{{type: text, text: "Look "}}, {{type: image, path: {IMAGE}}}, {{type: text, text: " here"}}]
  - id: same-as-text
    text: "User: Look <start_of_image> here"
    images: [{IMAGE}]
  - {{id: look, text: "Look <start_of_image> here", images: [{IMAGE}]}}
"""


def _run(tmp_path_factory, name: str, text: str):
    d = tmp_path_factory.mktemp(name)
    (d / "user.jinja").write_text(TEMPLATE)
    (d / "qwen.jinja").write_text(QWEN)
    path = d / f"{name}.yaml"
    path.write_text(text)
    run_dir, runner = run_experiment(path, d / "results")
    assert not runner.errors, runner.errors
    return run_dir


@pytest.fixture(scope="module")
def text_run(ray_cluster, tmp_path_factory):
    return _run(tmp_path_factory, "chat-text", TEXT)


@pytest.fixture(scope="module")
def vision_run(ray_cluster, tmp_path_factory):
    return _run(tmp_path_factory, "chat-vision", VISION)


def _tokenizer():
    from transformers import AutoTokenizer

    from crossengine.experiment.fixtures import ensure_fixture

    return AutoTokenizer.from_pretrained(ensure_fixture("tiny-text"))


def test_messages_are_rendered_with_the_engines_chat_template(text_run):
    tokens = pd.read_parquet(text_run / "tokens").sort_values(["sample_id", "position"])
    tokens = tokens[tokens["cand_engine"] == "b"]
    tok = _tokenizer()
    rendered = "User: The quick brown fox\nAssistant: jumps over the lazy dog\n"  # the template, written out by hand
    want = tok(rendered, add_special_tokens=False).input_ids  # the template writes any BOS itself
    got = tokens[tokens["sample_id"] == "chat"]["token_id"].tolist()
    assert got == want[1:], "positions 1.. are the rendered chat's tokens"
    plain = tokens[tokens["sample_id"] == "plain"]["token_id"].tolist()
    assert plain == tok("The quick brown fox").input_ids[1:], "text samples are unchanged"


def test_image_parts_go_where_the_template_puts_them(vision_run):
    tokens = pd.read_parquet(vision_run / "tokens")
    tokens = tokens[tokens["cand_engine"] == "b"]
    image_rows = tokens[tokens["modality"].astype(str) == "image"].groupby("sample_id").size()
    assert image_rows.get("chat", 0) > 0, "the image part was expanded into image tokens"
    assert image_rows["chat"] == image_rows["same-as-text"]


def test_a_model_without_a_chat_template_is_a_per_sample_error(ray_cluster, write_experiment, tmp_path):
    text = "model: tiny-text\nreference: a\nengines:\n  a: {type: hf}\n  b: {type: hf, attn_implementation: eager}\n" + TEXT[TEXT.index("samples:") :]
    run_dir, runner = run_experiment(write_experiment(text), tmp_path / "results")
    errors = {e["sample_id"]: e["error"] for e in runner.errors}
    assert "no chat template" in errors["chat"] and "chat_template: PATH" in errors["chat"], errors
    assert set(pd.read_parquet(run_dir / "tokens")["sample_id"]) == {"plain"}, "the other sample still runs"


def test_own_inputs_find_a_template_mismatch_at_its_first_token(text_run):
    inputs = pd.read_parquet(text_run / "inputs")
    inputs = inputs[inputs["sample_id"] == "chat"].set_index(["cand_engine", "input"])
    tok = _tokenizer()
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
    assert row["own_prompt_tokens"] > 0 and row["own_prompt_abs_lp_diff_mean"] > 0, "its own prompt's effect on the tokens both share"
    same = inputs.loc[("same", "input_ids")]
    assert same["status"] == "equal" and same["scored"] == "own" and pd.isna(same["own_prompt_tokens"])
    tokens = pd.read_parquet(text_run / "tokens")
    qwen = tokens[(tokens["cand_engine"] == "qwen") & (tokens["sample_id"] == "chat")].sort_values("position")
    assert qwen["token_id"].tolist() == a[1:], "qwen was scored on the reference's ids"
    from rich.console import Console

    from crossengine.report.terminal import print_summary

    console = Console(record=True, width=250)
    print_summary(text_run, console)
    assert "inputs of 'same' equal the reference's on all 2 samples (input_ids)" in console.export_text(), "nothing found is said"
    page = (text_run / "report.html").read_text()
    assert "<h2>Inputs</h2>" in page and f"token ids differ at position {first}" in page, "the report leads with the input difference"


def test_an_input_present_on_one_side_only_is_reported_by_name(vision_run):
    inputs = pd.read_parquet(vision_run / "inputs")
    inputs = inputs[(inputs["cand_engine"] == "causal") & (inputs["sample_id"] == "look")].set_index("input")
    assert inputs.loc["token_type_ids", "status"] == "reference only"
    assert inputs.loc["input_ids", "status"] == "equal" and inputs.loc["input_ids", "scored"] == "own"
    assert inputs.loc["pixel_values", "status"] == "equal" and inputs.loc["pixel_values", "max_abs_diff"] == 0


def test_pixels_normalised_elsewhere_are_found_with_their_difference(vision_run):
    """The seed case: the HF processor normalises in float32 on the CPU, the native code sends uint8
    and normalises on the device in the model's dtype (here the pixels_on_device patch, bf16)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from crossengine.experiment.fixtures import ensure_fixture

    inputs = pd.read_parquet(vision_run / "inputs")
    row = inputs[(inputs["cand_engine"] == "device") & (inputs["sample_id"] == "look")].set_index("input").loc["pixel_values"]
    ip = AutoProcessor.from_pretrained(ensure_fixture("tiny-vision")).image_processor
    pil = [Image.open(IMAGE).convert("RGB")]
    cpu = ip(pil, return_tensors="np")["pixel_values"].astype(np.float64)  # float32 on the CPU, as the reference
    raw = torch.as_tensor(ip(pil, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"].round()).to(torch.bfloat16)
    mean, std = (torch.tensor(v, dtype=torch.bfloat16)[:, None, None] for v in (ip.image_mean, ip.image_std))
    device = ((raw * ip.rescale_factor - mean) / std).float().numpy().astype(np.float64)
    want = np.abs(cpu - device)
    assert row["status"] == "differs" and want.max() > 1e-3
    assert row["max_abs_diff"] == pytest.approx(want.max(), rel=1e-6) and row["mean_abs_diff"] == pytest.approx(want.mean(), rel=1e-6)


def test_a_native_chat_format_renders_like_the_equivalent_template(text_run):
    """chat_format: the training code's own rendering (here "User: …" lines); with inputs: own its ids
    must equal the reference's, rendered by the equivalent Jinja template."""
    rows = pd.read_parquet(text_run / "inputs")
    rows = rows[rows["sample_id"] == "chat"].set_index(["cand_engine", "input"])
    assert rows.loc[("native", "input_ids"), "status"] == "equal" and rows.loc[("native", "input_ids"), "scored"] == "own"
