"""Inside vLLM's worker: module outputs for localisation and the full logits of a prompt, without Python pairs.

vLLM runs its model in a worker process of its own; `CaptureExtension` is mixed into that worker (`worker_extension_cls`)
and called by name through `LLM.collective_rpc`, like the routing hook: no code is pickled across vLLM's IPC. Nothing is
installed until a run asks (localisation, `full_vocab: true`): with both off, vLLM runs as it ships.

Two things make vLLM's modules comparable with transformers' (vllm/model_executor/models/llama.py): a decoder layer
returns `(hidden_states, residual)` and leaves the residual add to the next layer's fused add + RMSNorm, so the residual
stream after layer i is the sum of the two, taken here; and it fuses projections (`qkv_proj`, `gate_up_proj`), which the
alignment (crossengine/compare/fused.py) compares with the concatenation of transformers' parts.

Full logits: a `prompt_logprobs` request makes vLLM compute its logits for the prompt's positions in
`_get_prompt_logprobs_dict`; the hidden states it passes to `compute_logits` there are kept per request (batched as vLLM
schedules them), and logits are computed again from them on request, a block of rows at a time, with the model's own
`compute_logits`: what vLLM computed, returned as one array instead of T × V (id, log-prob) pairs.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

import numpy as np

from .base import SampleError
from .blocks import LogitRows

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+$")  # a decoder layer in a ModuleList

# vLLM's own kernels that transformers runs as plain functions, not modules: the attention core, the rotation, the
# gated activation (SiluAndMul is act(gate) * up, where transformers' act_fn is act(gate) alone). Captured, never paired
# (a same-shaped module of the other side is not what they compute), and listed as having no counterpart.
INTERNAL_OPS = frozenset({"Attention", "MMEncoderAttention", "ApplyRotaryEmb", "MulAndSilu"})


def internal(cls: str) -> bool:
    return cls in INTERNAL_OPS or cls.endswith(("RotaryEmbedding", "AndMul"))


def encode_array(a) -> tuple[str, list[int], bytes]:
    """A numpy array as plain values for vLLM's IPC (its msgpack hands numpy back as raw triples when untyped)."""
    return str(a.dtype), list(a.shape), a.tobytes()


def decode_array(item):
    dtype, shape, data = item
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def prompt_key(ids) -> str:
    """A prompt's identity across vLLM's IPC: its token ids."""
    return hashlib.sha1(np.asarray(list(ids), dtype=np.int64).tobytes()).hexdigest()


def _rows(t, max_positions: int):
    """[T, ...] -> float32 numpy [min(T, max_positions), features]: vLLM's tensors are token-major, no batch dim."""
    import torch

    t = t[:max_positions]  # a copy: vLLM rotates q and k in place inside the qkv output after the hook has run
    return t.detach().to(torch.float32, copy=True).reshape(t.shape[0], -1).cpu().numpy()


def _tensors(values) -> list:
    import torch

    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2]


def stream_output(name: str, output):
    """What a module hands on; for a decoder layer returning (hidden_states, residual), their sum: the residual stream
    transformers' layer returns (vLLM adds the two in the next layer's norm)."""
    parts = _tensors(output if isinstance(output, (tuple, list)) else [output])
    if _LAYER.search(name) and len(parts) == 2 and parts[0].shape == parts[1].shape:
        return parts[0] + parts[1]
    return parts[0] if parts else None


def stream_input(name: str, args, kwargs):
    """What a module was given: its first floating-point tensor; a decoder layer's (hidden_states + residual), as above."""
    parts = _tensors(list(args) + list(kwargs.values()))
    if _LAYER.search(name) and len(parts) == 2 and parts[0].shape == parts[1].shape:
        return parts[0] + parts[1]
    return parts[0] if parts else None


class CaptureExtension:
    """Methods added to vLLM's worker (`self.model_runner`)."""

    def _crossengine_logits_hooks(self) -> None:
        """Keep the hidden states each prompt-logprobs step passes to `compute_logits`, per request (and, for a capture,
        the logits of every call in order: the prompt's rows, then the sampled position's). Installed once, on first use.

        `_get_prompt_logprobs_dict` slices each request's rows out of the step's hidden states: where a slice starts
        in that tensor says whose it is (the step's `query_start_loc`), so prompts stay batched as vLLM schedules them."""
        if getattr(self, "_ce_hidden", None) is not None:
            return
        runner, model = self.model_runner, self.model_runner.get_model()
        self._ce_hidden, self._ce_keep, self._ce_step, self._ce_logit_calls = {}, False, None, None
        prompt_logprobs, compute_logits = runner._get_prompt_logprobs_dict, model.compute_logits

        def in_prompt(hidden_states, *args, **kwargs):
            starts = {int(runner.query_start_loc.np[i]): rid for rid, i in runner.input_batch.req_id_to_index.items()}
            self._ce_step = (hidden_states, starts)
            try:
                return prompt_logprobs(hidden_states, *args, **kwargs)
            finally:
                self._ce_step = None

        def logits(hidden_states, *args, **kwargs):
            out = compute_logits(hidden_states, *args, **kwargs)
            if self._ce_step is not None and self._ce_keep:
                base, starts = self._ce_step
                rid = starts.get((hidden_states.storage_offset() - base.storage_offset()) // max(base.stride(0), 1))
                if rid is not None:
                    key = prompt_key(runner.requests[rid].prompt_token_ids)
                    # the logits are a fresh tensor vLLM only reads (log-softmax, gather); hidden states are a view of a buffer it reuses
                    kept = out.detach() if self._ce_keep == "logits" else hidden_states.detach().clone()
                    self._ce_hidden.setdefault(key, {}).setdefault(rid, []).append(kept)
            if self._ce_logit_calls is not None and out is not None:
                self._ce_logit_calls.append((self._ce_step is not None, out.detach().float().cpu()))
            return out

        runner._get_prompt_logprobs_dict = in_prompt
        model.compute_logits = logits

    # ---------------------------------------------------------------- full logits

    def crossengine_logits_keep(self, keep: str | None) -> None:
        """From now on (until told otherwise) every prompt's `logits` (as vLLM computed them) or `hidden` states (logits
        computed again from them, a block at a time: under a logits budget) are kept, by its token ids, or nothing
        (None); the last batch's are dropped."""
        self._crossengine_logits_hooks()
        self._ce_keep = keep
        self._ce_hidden.clear()
        self._ce_ready = {}

    def crossengine_logits_scores(self, key: str, ids: list[int], k: int, block: int, path: str | None = None) -> tuple:
        """(token log-probs [T-1], top-k ids [T-1, k], top-k log-probs [T-1, k], vocabulary width) of the next kept prompt
        with these ids, computed on the worker's device a block of rows at a time; row t predicts token t + 1. With
        `path`, the logits go there as they are computed: a float32 [T, V] file (row 0 NaN) the engine maps, one copy
        instead of vLLM's IPC hops; without, its hidden states stay under `key` for `crossengine_logits_rows`."""
        import torch

        requests = self._ce_hidden[prompt_key(ids)]
        chunks = requests.pop(next(iter(requests)))  # the prompt's chunks, in order (logits or hidden states)
        hidden = self._ce_ready[key] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        target = torch.as_tensor(ids[1 : hidden.shape[0] + 1], device=hidden.device)
        lps, top_ids, top_lps, out, width = [], [], [], None, 0
        for a in range(0, hidden.shape[0], block):
            logits = (hidden[a : a + block] if self._ce_keep == "logits" else self.model_runner.get_model().compute_logits(hidden[a : a + block])).float()
            width = logits.shape[1]
            if path is not None:
                if out is None:
                    out = np.memmap(path, dtype=np.float32, mode="r+", shape=(hidden.shape[0] + 1, width))
                    out[0] = np.nan
                out[a + 1 : a + 1 + logits.shape[0]] = logits.cpu().numpy()
            lp = logits.log_softmax(-1)
            lps.append(lp.gather(-1, target[a : a + block, None])[:, 0].cpu())
            v, i = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], torch.empty((lp.shape[0], 0), dtype=torch.long))
            top_ids.append(i.cpu())
            top_lps.append(v.cpu())
        if out is not None:
            out.flush()
            self._ce_ready.pop(key)
        cat = lambda xs, dtype: np.ascontiguousarray(torch.cat(xs).numpy().astype(dtype))  # noqa: E731
        return encode_array(cat(lps, np.float32)), encode_array(cat(top_ids, np.int64)), encode_array(cat(top_lps, np.float32)), width

    def crossengine_logits_rows(self, key: str, a: int, b: int) -> tuple:
        """Logits rows a..b-1 (float32) of the prompt scored under `key` (computed again by the model's own head from
        its hidden states)."""
        kept = self._ce_ready[key][a:b]
        return encode_array((kept if self._ce_keep == "logits" else self.model_runner.get_model().compute_logits(kept)).float().cpu().numpy())

    # ---------------------------------------------------------------- module capture

    def crossengine_capture_begin(self, patterns: list[str] | None, max_positions: int) -> None:
        """Forward hooks on every module `patterns` selects (all, by default) for the next prompt's forwards: one, or one
        per chunk where vLLM prefills it in chunks (each module's rows are joined in order, up to `max_positions`)."""
        self._crossengine_logits_hooks()
        regexes = [re.compile(p) for p in patterns] if patterns else None
        model = self.model_runner.get_model()
        self._ce_records, self._ce_seen, self._ce_handles, self._ce_logit_calls, self._ce_forward = {}, set(), [], [], 0

        def step(_module, _args):
            self._ce_forward += 1

        def hook(name: str, leaf: bool):
            def fn(_module, args, kwargs, output):
                out = stream_output(name, output)
                if (name, self._ce_forward) in self._ce_seen or out is None:
                    return
                self._ce_seen.add((name, self._ce_forward))  # a shared module (rotary) at its first call of a forward, as for transformers
                inp = stream_input(name, args, kwargs)
                record = self._ce_records.setdefault(name, [name, leaf, type(_module).__name__, [], []])
                if sum(len(x) for x in record[3]) < max_positions:
                    record[3].append(_rows(out, max_positions))
                    record[4].append(None if inp is None else _rows(inp, max_positions))

            return fn

        self._ce_logits_name = next((n for n, m in model.named_modules() if type(m).__name__ == "LogitsProcessor"), "logits_processor")
        self._ce_want_logits = regexes is None or any(r.match(self._ce_logits_name) for r in regexes)
        self._ce_handles.append(model.register_forward_pre_hook(step))
        for name, module in model.named_modules():
            if name and name != self._ce_logits_name and (regexes is None or any(r.match(name) for r in regexes)):
                leaf = next(module.children(), None) is None
                self._ce_handles.append(module.register_forward_hook(hook(name, leaf), with_kwargs=True))
        self._ce_max_positions = max_positions

    def crossengine_capture_end(self) -> list:
        """The records of the prompt just run: (name, leaf, class, output, input) in the order forwards finished, then its
        logits (the prompt's rows and the sampled position's: [T, V], as transformers' lm_head gives them)."""
        import torch

        for h in self._ce_handles:
            h.remove()
        calls, self._ce_logit_calls = self._ce_logit_calls or [], None
        n = self._ce_max_positions
        join = lambda parts: None if any(p is None for p in parts) else np.concatenate(parts)[:n]  # noqa: E731
        records = [(name, leaf, cls, join(outs), join(ins)) for name, leaf, cls, outs, ins in self._ce_records.values()]
        prompt = [x for flag, x in calls if flag]
        last = [x for flag, x in calls if not flag][-1:]  # the sampled position's logits come with the prompt's last chunk
        if prompt and self._ce_want_logits:
            records.append((self._ce_logits_name, True, "LogitsProcessor", _rows(torch.cat(prompt + last), n), None))
        self._ce_records, self._ce_handles = {}, []
        return [(name, leaf, cls, encode_array(o), None if i is None else encode_array(i)) for name, leaf, cls, o, i in records]


class WorkerRows(LogitRows):
    """A long prompt's logits left in vLLM's worker (placement.logits_budget_gb): rows computed there on request."""

    def __init__(self, llm, key: str, shape: tuple[int, int], block: int):
        self.llm, self.key, self.shape, self.block = llm, key, shape, block

    def rows(self, a: int, b: int):
        out = np.empty((b - a, self.shape[1]), np.float32)
        lo = max(a, 1)
        if a == 0:
            out[0] = np.nan
        if b > lo:  # row t predicts token t: the worker's hidden row t - 1
            out[lo - a :] = decode_array(self.llm.collective_rpc("crossengine_logits_rows", args=(self.key, lo - 1, b - 1))[0])
        return out


class VLLMInside:
    """The vllm engine's localisation and full-logits methods (traits captures_modules, chunks_logits)."""

    _keeping = False  # its worker keeps prompts' hidden states (full_vocab through the worker)

    def capture(self, samples: list, patterns: list[str] | None, max_positions: int = 512) -> list[list[dict]]:
        """Per sample, its module outputs inside vLLM's worker (one prompt per call: the hooks see only its tokens); a
        sample this engine cannot run is its SampleError, in its place."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = []
        for s in samples:
            self.llm.collective_rpc("crossengine_capture_begin", args=(patterns, max_positions))
            try:
                result = self._run([s], params)[0]
            finally:
                records = self.llm.collective_rpc("crossengine_capture_end")[0]
            if isinstance(result, SampleError):
                out.append(result)
                continue
            out.append(
                [{"name": n, "leaf": leaf, "output": decode_array(o).copy(), "input": None if i is None else decode_array(i).copy(), "internal": internal(cls)} for n, leaf, cls, o, i in records]
            )
        return out

    def limit_logits(self, budget: int) -> None:
        """Longer prompts' logits stay in vLLM's worker and come a block of rows at a time (`WorkerRows`)."""
        self.logits_budget = int(budget)

    def worker_scores(self, key: str, ids, k: int) -> tuple:
        """(token log-prob [T], top-k ids [T, k], top-k log-probs [T, k], logits [T, V] or WorkerRows) of the prompt just
        run under `key`: from its logits in vLLM's worker; row 0 (it predicts nothing) padded. Whole logits come through
        a file in shared memory (mapped here, unlinked at once: the mapping keeps it until the array is dropped)."""
        n, vocab = len(ids), self.vocab_size
        block = self._block_rows(n)
        whole = block is None
        block = block or n
        path = None
        if whole:
            fd, path = tempfile.mkstemp(prefix="crossengine-logits-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, n * vocab * 4)
            os.close(fd)
        try:
            *scores, width = self.llm.collective_rpc("crossengine_logits_scores", args=(key, [int(x) for x in ids], k, block, path))[0]
            lp, top_ids, top = (decode_array(x) for x in scores)
            logits = np.memmap(path, dtype=np.float32, mode="c", shape=(n, width)) if whole else WorkerRows(self.llm, key, (n, width), block)
        finally:
            if path is not None:
                os.unlink(path)
        pad = lambda a, fill: np.concatenate([np.full((1, *a.shape[1:]), fill, a.dtype), a])  # noqa: E731
        return pad(lp, np.nan), pad(top_ids, -1), pad(top, np.nan), logits
