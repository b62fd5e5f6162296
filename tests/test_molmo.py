"""The seed case: tiny-molmo's training code (native) against its HF port, as experiments/molmo-style.yaml
runs it. Each expectation is computed here from the two implementations' own pieces (the port's
processor and template, the training code's chat format and normalisation), never typed in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crossengine.identity import display_name

from .conftest import EXPERIMENTS, run_text
from .test_report import needs_browser, open_in_browser

SHIPPED = (EXPERIMENTS / "molmo-style.yaml").read_text().replace("data/", f"{EXPERIMENTS}/data/")


def _pooled(run_dir) -> pd.DataFrame:
    s = pd.read_parquet(run_dir / "summary.parquet")
    for c in ("modality", "attention", "segment", "position_bucket", "cand_engine", "variant"):
        s[c] = s[c].astype(str)
    all_ = s[(s["modality"] == "all") & (s["attention"] == "all") & (s["segment"] == "all") & (s["position_bucket"] == "all")]
    return all_.assign(name=[display_name(c, v) for c, v in zip(all_["cand_engine"], all_["variant"])]).set_index("name")


def _inputs(run_dir) -> pd.DataFrame:
    d = pd.read_parquet(run_dir / "inputs")
    return d.assign(name=[display_name(c, v) for c, v in zip(d["cand_engine"].astype(str), d["variant"].astype(str))])


@pytest.fixture(scope="module")
def shipped(ray_cluster, tmp_path_factory):
    """experiments/molmo-style.yaml as shipped (bfloat16)."""
    _, run_dir, runner = run_text(tmp_path_factory, "molmo", SHIPPED)
    assert not runner.errors, runner.errors
    return run_dir


@pytest.fixture(scope="module")
def fp32(ray_cluster, tmp_path_factory):
    """The same experiment in float32, where the two implementations must agree once fixed."""
    text = SHIPPED.replace("dtype: bfloat16", "dtype: float32") + "localize: {samples: 1, audit_buffers: false}\n"
    _, run_dir, runner = run_text(tmp_path_factory, "molmo32", text)
    assert not runner.errors, runner.errors
    return run_dir


def _port_and_native():
    from PIL import Image
    from transformers import AutoProcessor

    from crossengine.experiment.fixtures import ensure_fixture
    from crossengine.training_code import tinymolmo

    processor = AutoProcessor.from_pretrained(ensure_fixture("tiny-molmo"), trust_remote_code=True)
    image = Image.open(EXPERIMENTS / "data" / "gradient.png").convert("RGB")
    return processor, tinymolmo, image


SKY = [
    {"role": "user", "content": [{"type": "text", "text": "Look at this picture "}, {"type": "image"}, {"type": "text", "text": " and tell me what the sky is like."}]},
    {"role": "assistant", "content": "The sky is calm in the morning."},
]


def test_the_template_mismatch_is_found_at_its_first_token(fp32):
    processor, native, _ = _port_and_native()
    turns = SKY
    tok = processor.tokenizer
    expand = lambda t: t.replace("<image>", "<img_start>" + "<img_patch>" * 4 + "<img_end>")  # noqa: E731
    a = tok(expand(native.chat_format(turns)), add_special_tokens=False).input_ids
    b = tok(expand(processor.apply_chat_template(turns, tokenize=False)), add_special_tokens=False).input_ids
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    rows = _inputs(fp32).set_index(["name", "sample_id", "input"])
    row = rows.loc[("hf-port", "sky", "input_ids")]
    assert row["status"] == "differs" and row["first_difference"] == first
    assert (row["ref_token"], row["cand_token"]) == (tok.decode([a[first]]), tok.decode([b[first]]))
    assert row["scored"] == "reference_text", "scored on the reference's ids, with the port's own pixels and inputs"
    fixed = rows.loc[("fix-template", "sky", "input_ids")]
    assert fixed["status"] == "equal" and fixed["scored"] == "own", "the template file renders exactly the training code's format"


def test_the_own_prompt_effect_equals_an_in_process_computation(fp32):
    """How much the port's own template moves the tokens both prompts share, recomputed here with the
    port in this process: both renderings through its processor, its log-probs, difflib's alignment."""
    from difflib import SequenceMatcher

    import torch
    from transformers import AutoModelForImageTextToText

    from crossengine.experiment.fixtures import ensure_fixture

    processor, native, image = _port_and_native()
    model = AutoModelForImageTextToText.from_pretrained(ensure_fixture("tiny-molmo"), trust_remote_code=True, dtype=torch.float32).eval()

    def logprobs(text):
        enc = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            lp = model(**enc).logits[0, :-1].log_softmax(-1)
        ids = enc["input_ids"][0]
        return ids.tolist(), np.concatenate([[np.nan], lp.gather(-1, ids[1:, None])[:, 0].double().numpy()])

    a, lp_a = logprobs(native.chat_format(SKY))
    b, lp_b = logprobs(processor.apply_chat_template(SKY, tokenize=False))
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    pairs = [(i + k, j + k) for i, j, n in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() for k in range(n) if i + k > first and j + k > 0]
    d = np.asarray([lp_b[j] - lp_a[i] for i, j in pairs])
    row = _inputs(fp32).set_index(["name", "sample_id", "input"]).loc[("hf-port", "sky", "input_ids")]
    assert row["own_prompt_tokens"] == len(d) > 0
    assert row["own_prompt_abs_lp_diff_mean"] == pytest.approx(np.abs(d).mean(), rel=1e-4, abs=1e-6)
    assert row["own_prompt_abs_lp_diff_max"] == pytest.approx(np.abs(d).max(), rel=1e-4, abs=1e-6)
    assert row["own_prompt_lp_sum_diff"] == pytest.approx(d.sum(), rel=1e-4, abs=1e-5)


def test_pixels_normalised_in_the_model_are_found_with_their_difference(fp32):
    processor, native, image = _port_and_native()
    port = processor.image_processor([image], return_tensors="np")["pixel_values"].astype(np.float32)  # float32 on the CPU
    raw = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None]  # uint8 values, [1, 3, H, W]
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (native.MEAN, native.STD))
    inside = (raw * np.float32(1 / 255) - mean) / std  # the training code's formula, in the model's float32
    want = np.abs(port.astype(np.float64) - inside.astype(np.float64))
    rows = _inputs(fp32).set_index(["name", "sample_id", "input"])
    row = rows.loc[("hf-port", "sky", "pixel_values")]
    assert want.max() > 0 and row["status"] == "differs"
    assert row["max_abs_diff"] == pytest.approx(want.max(), rel=1e-6) and row["mean_abs_diff"] == pytest.approx(want.mean(), rel=1e-6)
    assert rows.loc[("fix-pixels", "sky", "pixel_values"), "max_abs_diff"] == 0, "pixels_on_device normalises as the training code does"


def test_token_type_ids_is_reported_by_name_and_bidirectional(fp32):
    rows = _inputs(fp32)
    port = rows[(rows["name"] == "hf-port") & (rows["input"] == "token_type_ids")]
    assert set(port["status"]) == {"candidate only"} and set(port["sample_id"]) == {"sky", "two-images"}
    assert rows[(rows["name"] == "fix-causal") & (rows["input"] == "token_type_ids")].empty, "withheld: never reaches the model"
    tokens = pd.read_parquet(fp32 / "tokens", columns=["variant", "modality", "attention_cand"])
    image = tokens[tokens["modality"].astype(str) == "image"]
    kinds = image.groupby(image["variant"].astype(str))["attention_cand"].agg(lambda a: set(a.astype(str)))
    assert kinds["base"] == {"bidirectional"} and kinds["fix-causal"] == {"causal"}


def test_with_all_fixes_the_two_implementations_agree_to_float32_noise(fp32):
    rows = _inputs(fp32)
    fixed = rows[rows["name"] == "all-fixes"]
    assert set(fixed["status"]) == {"equal"} and set(fixed["input"]) == {"input_ids", "image_tokens", "pixel_values"}
    tokens = pd.read_parquet(fp32 / "tokens", columns=["variant", "kl_ref_cand", "top1_match", "abs_lp_diff"])
    mine = tokens[tokens["variant"].astype(str) == "all-fixes"]
    assert mine["top1_match"].all()
    assert mine["abs_lp_diff"].max() < 1e-4 and mine["kl_ref_cand"].max() < 1e-8, "float32 noise: fused vs separate projections, op order"
    pooled = _pooled(fp32)
    assert pooled.loc["hf-port", "kl_mean"] > 1e4 * pooled.loc["all-fixes", "kl_mean"]


def test_the_shipped_ablation_says_which_difference_matters(shipped):
    """bfloat16, as on the GPU: the bidirectional image mask is the difference that moves the log-probs;
    the template changes the token ids (an input finding; scored on the reference's ids it leaves the
    numbers as they are); all fixes together are closest to the training code."""
    pooled = _pooled(shipped)
    kl = pooled["kl_mean"]
    assert kl["fix-template"] == kl["hf-port"]
    assert kl["fix-causal"] < kl["hf-port"] / 10 and kl["fix-causal"] < kl["fix-pixels"]
    assert kl["all-fixes"] == kl.min()
    from crossengine.compare.inputs import differing_inputs

    differing = differing_inputs(pd.read_parquet(shipped / "inputs"))
    assert differing["all-fixes"] == "none"
    assert "input_ids" in differing["hf-port"] and "input_ids" not in differing["fix-template"]
    assert "pixel_values" not in differing["fix-pixels"] and "token_type_ids" not in differing["fix-causal"]


@needs_browser
def test_the_report_opens_with_the_inputs_matrix(shipped, tmp_path):
    """In a real browser: the Inputs section leads, its candidate x input matrix says where each
    variant's inputs differ, and the ablation chart names them beside the KL."""
    import re

    dom = open_in_browser(shipped / "report.html", tmp_path)
    start, end = dom.index("<h2>Inputs</h2>"), dom.index("<h2>Summary</h2>")
    assert start < end
    section = dom[start:end]
    cells = lambda name: re.search(rf"<tr><td>{name}</td>(.*?)</tr>", section).group(1)  # noqa: E731 - the matrix row
    assert "differs on 3/3" in cells("hf-port") and "candidate only on 2/2" in cells("hf-port")
    assert "differs" not in cells("all-fixes") and cells("all-fixes").count(">equal<") == 3
    assert 'id="ablation-plot"' in dom and "inputs differ: " in (shipped / "report.html").read_text()


def test_localisation_traces_each_candidate_on_its_own_inputs(fp32):
    """With inputs: own the port is traced on its own pixels and mask (given the training code's
    `images` it would run without any); the first module apart is the first attention, at the first
    image token, in the port as published, and nothing is apart beyond float32 noise with all fixes."""
    layers = pd.read_parquet(fp32 / "layers.parquet")
    layers = layers.assign(name=[display_name(c, v) for c, v in zip(layers["cand_engine"].astype(str), layers["variant"].astype(str))])
    port = layers[layers["name"] == "hf-port"].set_index("module")
    assert port.loc["vision_backbone.patch_embedding", "cand_module"] == "model.vision.patch_embed", "the port's vision tower ran"
    tokens = pd.read_parquet(fp32 / "tokens", columns=["sample_id", "position", "modality", "variant"])
    sky = tokens[(tokens["sample_id"] == "sky") & (tokens["variant"].astype(str) == "base")]
    first_image = int(sky.loc[sky["modality"].astype(str) == "image", "position"].min())
    attn = port.loc["blocks.0.attn_out"]
    assert attn["max_abs_diff"] > 1e-2 and attn["first_position"] == first_image
    fixed = layers[layers["name"] == "all-fixes"]
    assert len(fixed) == len(port) and fixed["max_abs_diff"].max() < 1e-4
