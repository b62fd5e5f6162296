"""User code for the native-engine tests, named from experiments as "tests.native_factories:...".

`hf_as_native` wraps a transformers model behind the native interface: (input_ids, **inputs)
-> logits. `scale_logits` is a user patch that really changes the numbers.
"""

from __future__ import annotations


def hf_as_native(model_path, config, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return lambda input_ids, **inputs: model(input_ids=input_ids, **inputs).logits


def plain_tokens(text, images, engine, add_special_tokens=True):
    """A native preprocess that tokenises with the checkpoint's tokenizer and adds no other input."""
    return {"input_ids": engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids}


def scale_logits(engine) -> str:
    head = engine.model.get_output_embeddings()
    head.weight.data.mul_(1.01)
    return "output embedding scaled by 1.01"


def _hf_logits(model_path, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return lambda input_ids, **inputs: model(input_ids=input_ids, **inputs).logits


def gated(model_path, config, device, dtype, gate: str, free: int = 1):
    """The HF model, whose forward blocks from its (free + 1)-th call until the file GATE/release exists,
    and says so by writing GATE/blocked: a run a test can stop mid-way with no timing assumption."""
    import time
    from pathlib import Path

    forward = _hf_logits(model_path, dtype, device)
    calls = [0]

    def run(input_ids, **inputs):
        calls[0] += 1
        if calls[0] > free and not (Path(gate) / "release").exists():
            (Path(gate) / "blocked").touch()
            while not (Path(gate) / "release").exists():
                time.sleep(0.02)
        return forward(input_ids, **inputs)

    return run


def raise_always(model_path, config, device, dtype):
    """A model whose every forward raises: each sample of its engine fails, the others go on."""

    def run(input_ids, **inputs):
        raise RuntimeError("planted failure in every forward")

    return run


def die_on_length(model_path, config, device, dtype, length: int = 6, after: str | None = None):
    """The HF model, whose worker process dies (os._exit) on a sample of exactly `length` tokens, once
    the file `after` exists (the driver's part of the batch before: its reply has surely arrived)."""
    import os
    import time
    from pathlib import Path

    forward = _hf_logits(model_path, dtype, device)

    def run(input_ids, **inputs):
        if input_ids.shape[-1] == length:
            while after and not Path(after).exists():
                time.sleep(0.02)
            os._exit(3)
        return forward(input_ids, **inputs)

    return run


def nonfinite_at(model_path, config, device, dtype, position: int = 3, value: str = "nan"):
    """The HF model with a NaN (or +inf) in the logits that score token `position`."""
    forward = _hf_logits(model_path, dtype, device)

    def run(input_ids, **inputs):
        logits = forward(input_ids, **inputs).clone()
        if value == "nan":
            logits[..., position - 1, :] = float("nan")
        else:
            logits[..., position - 1, 7] = float("inf")
        return logits

    return run


def custom_tree(model_path, config, device, dtype, nudge: str | None = None):
    """A model of our own, named nothing like HF (emb, trunk.N.mix.q, trunk.N.ff.up, fin, out),
    deterministic from seed 0; `nudge` adds 1e-3 to one named weight."""
    import torch
    from torch import nn

    class Mix(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

        def forward(self, x):
            t = x.shape[1]
            scores = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            return self.o(scores.softmax(-1) @ self.v(x))

    class FF(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    class Stage(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.pre, self.mix, self.post, self.ff = nn.LayerNorm(d), Mix(d), nn.LayerNorm(d), FF(d)

        def forward(self, x):
            x = x + self.mix(self.pre(x))
            return x + self.ff(self.post(x))

    class Net(nn.Module):
        def __init__(self, vocab, d=64):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.trunk = nn.ModuleList(Stage(d) for _ in range(2))
            self.fin, self.out = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

        def forward(self, input_ids, **inputs):
            x = self.emb(input_ids)
            for stage in self.trunk:
                x = stage(x)
            return self.out(self.fin(x))

    torch.manual_seed(0)
    net = Net(config.vocab_size)
    if nudge:
        with torch.no_grad():
            dict(net.named_parameters())[nudge].add_(1e-3)
    return net.to(dtype)


PREFERRED = 77


def prefer_token(engine) -> str:
    """A user patch that plants a difference: token PREFERRED gets +1e4 on every logit row,
    so a greedy decode emits it at every step."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., PREFERRED] += 1e4
        return output

    engine.model.get_output_embeddings().register_forward_hook(hook)
    return f"lm_head output +1e4 at token {PREFERRED}"


def user_assistant(turns) -> str:
    """A native training code's chat format: "User: …" / "Assistant: …" lines (chat_format)."""
    return "".join(f"{t['role'].capitalize()}: {t['content']}\n" for t in turns)
