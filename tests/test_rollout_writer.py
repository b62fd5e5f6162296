"""RolloutWriter in a tiny training loop: batched tensors in (left-padded prompts, right-padded responses, as verl, TRL and
OpenRLHF hold them), one record per sequence out, read back bitwise by the dump reader; nothing half-written on a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossengine.adapters.dumps import DumpFile
from crossengine.dump import RolloutWriter
from crossengine.experiment.fixtures import ensure_fixture

PROMPTS = ["The quick brown fox", "When two engines disagree, the engineer", "Numbers"]


def rollout_step(model, tok, step: int):
    """One step of a tiny policy: left-padded prompts, sampled responses, the policy's own log-prob of each sampled token."""
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(step)
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    responses = out.sequences[:, batch.input_ids.shape[1] :]
    logits = torch.stack(out.logits, 1).float()  # [B, R, V], raw
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    eos = (responses == tok.eos_token_id).int().cumsum(1)
    real = (eos == 0) | ((eos == 1) & (responses == tok.eos_token_id))  # up to and with the first EOS; after it, padding
    response_mask = real.clone()
    response_mask[1, 2:4] = False  # a tool's output inside the second response: real tokens, not scored
    attention = torch.cat([batch.attention_mask, real.long()], 1)
    return out.sequences, logprobs, response_mask, attention


def test_a_training_loop_writes_dumps_that_read_back_bitwise(tmp_path):
    folder = ensure_fixture("tiny-text", seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    for step in range(2):
        seqs, lps, mask, attention = rollout_step(model, tok, step)
        with RolloutWriter(tmp_path / f"step_{step}.jsonl", id_prefix=f"step{step}-") as w:
            ids = w.write(seqs, lps, mask, attention)  # the response block: [B, R] beside [B, T]
        assert ids == [f"step{step}-{i}" for i in range(len(PROMPTS))]
        dump = DumpFile(tmp_path / f"step_{step}.jsonl")
        for row, (rid, pointer, _) in enumerate(dump.index()):
            assert rid == ids[row]
            rec = dump.read(pointer)
            keep = attention[row].bool()
            assert rec.id == ids[row] and rec.token_ids.tolist() == seqs[row][keep].tolist(), "padding dropped, order kept"
            prompt = int(keep[: -lps.shape[1]].sum())
            assert rec.prompt_len == prompt
            real = attention[row, -lps.shape[1] :].bool()  # the response's real tokens
            scored, want = mask[row][real].numpy(), lps[row][real].numpy()
            assert not scored.all() if row == 1 else scored.all(), "the tool output is kept as tokens, not scored"
            np.testing.assert_array_equal(rec.scored[prompt:], scored)
            np.testing.assert_array_equal(rec.logprobs[prompt:][scored], want[scored])
    assert not list(tmp_path.glob(".*partial")), "the temporary files became the dumps"


def test_a_crash_leaves_no_dump_and_bad_rows_are_one_line(tmp_path):
    with pytest.raises(RuntimeError), RolloutWriter(tmp_path / "d.jsonl") as w:
        w.write([[1, 2, 3]], [[-1.0, -2.0]], [[1, 1]])
        raise RuntimeError("the trainer died")
    assert not list(tmp_path.iterdir()), "nothing under the dump's name, no temporary file left"
    with RolloutWriter(tmp_path / "e.jsonl") as w:
        with pytest.raises(ValueError, match="row 0 scores no token"):
            w.write([[1, 2, 3]], [[-1.0, -2.0]], [[0, 0]])
        with pytest.raises(ValueError, match="row 0 scores its first token"):
            w.write([[1, 2, 3]], [[-1.0, -2.0, -3.0]], [[1, 1, 1]])
        w.write([[1, 2, 3]], np.asarray([[-1.0, -2.0]], np.float32), [[1, 1]])
    assert json.loads((tmp_path / "e.jsonl").read_text()) == {"id": "0", "token_ids": [1, 2, 3], "prompt_len": 1, "logprobs": [-1.0, -2.0]}
