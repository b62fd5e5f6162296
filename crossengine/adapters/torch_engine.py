"""What the hf and native engines share: a PyTorch model that returns logits for one sample.

Tokenisation and image processing (HF tokenizer/processor from the checkpoint folder),
modality tags, the model inputs, validity checks, the conversion of logits to arrays,
module capture and the buffer audit. A subclass says only how its model is built
(`_load_model`) and called (`forward_logits`); neither engine inherits the other, so HF-only
behaviour (transformers' loading, PEFT, generation) stays in hf.py; the built-in patches
change transformers models and config.py rejects them on native engines (user
`module:function` patches apply to both).

By default every sample runs as its own forward pass, unpadded (`batching: single`): padding
changes the numerics (measured on this CPU: a right-padded batch of unequal lengths moves
fp32 log-probs by 1e-5 and bf16 ones by 0.1), and a parity tool must not add differences of
its own. A trainer does not run that way, so `batching: padded | packed` with
`micro_batch_size` runs samples as a trainer's micro-batches do: padded rows (right or left,
position ids from the mask as trainers compute them), or packed into one row (position ids
restarting per sample, a block-diagonal causal mask; flash-attention takes the position ids
alone, as remove-padding trainers run it). These are run conditions: a variant can differ by
them alone, and the noise floor (crossengine/compare/noise.py) switches them per call.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

import numpy as np

from .base import Engine, EngineInfo, RawSample, Sample, SampleError, TokenLogprobs
from .blocks import HeadRows, blocks, shifted_rows, topk_from_logprobs
from .chat import render_chat
from .inspect import audit_buffers, audit_weights, capture_outputs
from .micro_batches import MicroBatches
from .patches import (
    apply_patches,  # built-in ones are HF-only: config rejects them on native engines
)
from .sampling import processed
from .tokens import mask_kinds, text_modality, tokenizer_fingerprint, vocab_error
from .torch_routing import RoutedScoring
from .torch_spec import resolve_device, torch_dtype, versions


class TorchEngine(RoutedScoring, MicroBatches, Engine):
    """A torch model scoring one unpadded sample per forward; see the module docstring."""

    def __init__(self, spec, model_path: str, instance: str, seed: int = 0):
        super().__init__(spec, model_path, instance, seed)
        import torch

        torch.manual_seed(seed)
        self.device = resolve_device(spec.device)
        self.dtype = torch_dtype(spec.dtype)
        common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self.config = self._load_config(common)
        self.is_vision = getattr(self.config, "vision_config", None) is not None
        self.dropped_inputs = set(spec.drop_inputs)  # patches may add to it
        self.pixels_on_device = False  # set by the pixels_on_device patch
        self.routers: list | None = None  # the MoE routers in forward order, once report_routing found them
        self._replay: dict[str, np.ndarray] = {}  # sample id -> the reference's routing this engine replays (replay_routing)
        self.model = self._load_model(common)
        self.tokenizer, self.processor = self._load_tokenizer(common)

        self.patch_report = apply_patches(self, spec.patches)

    def _load_config(self, common: dict):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.model_path, **common)

    def _load_model(self, common: dict):
        """Build the model (on self.device, in self.dtype, eval mode)."""
        raise NotImplementedError

    def _load_tokenizer(self, common: dict):
        from transformers import AutoProcessor, AutoTokenizer

        if self.is_vision:
            processor = AutoProcessor.from_pretrained(self.model_path, **common)
            return processor.tokenizer, processor
        return AutoTokenizer.from_pretrained(self.model_path, **common), None

    # ------------------------------------------------------------------ interface

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.instance,
            engine=self.name,
            versions=versions(),
            device=self.device,
            dtype=str(self.spec.dtype),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            special_ids=sorted(int(i) for i in self.tokenizer.all_special_ids),
            extra={
                "model_type": self.config.model_type,
                "vocab_size": int(self.vocab_size),
                "patches": self.patch_report,
            },
        )

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None:
            return int(head.weight.shape[0])
        return int(self.config.get_text_config().vocab_size)  # remote code without the accessor

    def prepare(self, raw: list[RawSample]) -> list[Sample | SampleError]:
        out: list[Sample | SampleError] = []
        for r in raw:
            try:
                out.append(self._prepare_one(r))
            except SampleError as e:
                out.append(e)
            except Exception as exc:  # noqa: BLE001 - a processor error on one sample: report it, go on
                out.append(SampleError.from_exception(r.id, self.instance, exc))
        return out

    def _prepare_one(self, r: RawSample) -> Sample:
        sid = r.id
        inputs: dict[str, np.ndarray] = {}
        text, image_paths, rendered = r.text, r.images, r.rendered
        if r.messages is not None:  # the chat template writes BOS and turn markers itself
            text, image_paths = render_chat(self.chat_renderer(), r, self.spec.chat_template, self.instance)
            rendered = True
        if r.token_ids is not None:
            ids = np.asarray(r.token_ids, dtype=np.int64)
        else:
            from PIL import Image

            ids, inputs = self._encode(sid, text, [Image.open(p).convert("RGB") for p in image_paths], add_special_tokens=not rendered)
        if r.max_length and len(ids) > r.max_length:
            ids = ids[: r.max_length]
            if "token_type_ids" in inputs:
                inputs["token_type_ids"] = inputs["token_type_ids"][:, : r.max_length]
        if len(ids) < 2:
            raise SampleError(sid, "has fewer than 2 tokens; nothing to score")
        prompt_len = r.prompt_len if r.prompt_len is not None and r.prompt_len < len(ids) else None
        sample = Sample(sid, ids, self._modality(ids), text=text, images=[str(p) for p in image_paths], model_inputs=inputs, rendered=rendered, prompt_len=prompt_len)
        if self.transforms_inputs:  # what input comparisons see of this engine's side (crossengine/compare/inputs.py)
            sample.input_view = self.input_view(sample)
        return sample

    def _encode(self, sid: str, text: str, images: list, add_special_tokens: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Token ids and the other model inputs of one prompt: the checkpoint's tokenizer or processor."""
        if not images:
            return np.asarray(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids, dtype=np.int64), {}
        if self.processor is None:
            raise SampleError(sid, f"has images but model {self.model_path} is text-only")
        enc = self.processor(text=[text], images=[images], return_tensors="np", add_special_tokens=add_special_tokens)
        ids = enc.pop("input_ids")[0].astype(np.int64)
        enc.pop("attention_mask", None)
        return ids, {k: np.asarray(v) for k, v in enc.items()}

    @property
    def transforms_inputs(self) -> bool:
        """Whether inputs reach the model other than as prepared (dropped, normalised on the device, or
        a model that says how it sees them): then samples carry an `input_view` for comparisons."""
        return bool(self.dropped_inputs) or self.pixels_on_device or hasattr(self.model, "input_view")

    def input_view(self, sample: Sample) -> dict[str, np.ndarray]:
        """The sample's inputs as they reach this model, as numpy: after drop_inputs and device-side
        normalisation, and through the model's own `input_view(**inputs)` where it has one (a
        native model that normalises inside, say, shows its pixels under the names the port uses)."""
        inputs = self._inputs(sample)
        inputs.pop("input_ids")
        view = getattr(self.model, "input_view", None)
        if view is not None:
            inputs = view(**inputs)
        return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy() for k, v in inputs.items()}

    def chat_renderer(self):
        """What renders `messages`: the tokenizer's or processor's chat template (a native engine may override)."""
        return self.processor or self.tokenizer

    def _modality(self, ids: np.ndarray) -> np.ndarray:
        image_id = getattr(self.config, "image_token_id", None) or getattr(self.config, "image_token_index", None)
        return text_modality(ids, self.tokenizer.all_special_ids, image_id)

    def _inputs(self, sample: Sample, ids: np.ndarray | None = None) -> dict[str, Any]:
        import torch

        ids = sample.input_ids if ids is None else ids
        out: dict[str, Any] = {"input_ids": torch.as_tensor(ids, device=self.device)[None]}
        for key, value in sample.model_inputs.items():
            if key in self.dropped_inputs:
                continue
            if key == "pixel_values" and self.pixels_on_device and sample.images:
                out[key] = self._pixels_on_device(sample)
                continue
            t = torch.as_tensor(value, device=self.device)
            if key == "token_type_ids" and t.shape[-1] != len(ids):  # completion tokens are text
                pad = torch.zeros((*t.shape[:-1], len(ids) - t.shape[-1]), dtype=t.dtype, device=self.device)
                t = torch.cat([t, pad], dim=-1)
            out[key] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def _pixels_on_device(self, sample: Sample):
        """uint8 pixels to the device, then rescale and normalise there in the model dtype."""
        import torch
        from PIL import Image

        ip = self.processor.image_processor
        images = [Image.open(p).convert("RGB") for p in sample.images]
        raw = ip(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        x = torch.as_tensor(raw.round().astype("uint8"), device=self.device).to(self.dtype)
        mean = torch.as_tensor(ip.image_mean, device=self.device, dtype=self.dtype)[:, None, None]
        std = torch.as_tensor(ip.image_std, device=self.device, dtype=self.dtype)[:, None, None]
        return (x * ip.rescale_factor - mean) / std

    def forward_logits(self, sample: Sample):
        """Raw logits [T, V] in float32 for one sample."""
        raise NotImplementedError

    def timings(self) -> dict[str, float]:
        return {"forward_s": self.forward_s}

    forward_s = 0.0  # seconds in the model's forwards (run.json's `<name>.forward_s`), added by `forward_clock`

    @contextlib.contextmanager
    def forward_clock(self):
        """Adds the block's wall time to `forward_s`: every forward of a torch engine runs inside one."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.forward_s += time.perf_counter() - t

    def capture(self, samples: list[Sample], patterns: list[str] | None, max_positions: int = 512):

        return [capture_outputs(self.model, lambda s=s: self.forward_logits(s), patterns, max_positions) for s in samples]

    def audit(self, against: str | None = None):

        return audit_weights(self.model, getattr(self, "missing_keys", [])) + audit_buffers(self.model, self.config, self.device)

    def score(self, samples: list[Sample], top_k: int, full_vocab: bool) -> list[TokenLogprobs | SampleError]:
        """Each valid sample's scores, in place; its forward pass as `spec.batching` says."""
        out: list = list(samples)  # a SampleError from the reference stays in its place
        todo = []
        for i, s in enumerate(samples):
            if isinstance(s, SampleError):
                continue
            out[i] = self.invalid(s) or self._unbatchable(s)
            if out[i] is None:
                todo.append(i)
        single = self.spec.batching == "single" or self.routers is not None  # routing is read per sample
        groups = [[i] for i in todo] if single else [todo[j : j + self.spec.micro_batch_size] for j in range(0, len(todo), self.spec.micro_batch_size)]
        for group in groups:
            try:
                if single:
                    out[group[0]] = self._score_one(samples[group[0]], top_k, full_vocab)
                    continue
                for i, row in zip(group, self.forward_batch([samples[i] for i in group])):
                    out[i] = self._to_arrays(samples[i], row, top_k, full_vocab)
            except SampleError as exc:
                out[group[0]] = exc
            except Exception as exc:  # noqa: BLE001 - one line naming engine and sample; traceback to the run log
                for i in group:
                    out[i] = SampleError.from_exception(samples[i].sample_id, self.instance, exc)
        return out

    def _scores(self, s: Sample, top_k: int, full_vocab: bool) -> TokenLogprobs:
        """One sample's scores from one forward: its whole logits, or where they exceed `logits_budget`, a block
        of positions at a time from its last hidden states (`forward_hidden`), never all of them at once."""
        block = self._block_rows(len(s)) if full_vocab else None
        if block is None:
            return self._to_arrays(s, self.forward_logits(s), top_k, full_vocab)
        import torch

        hidden, head = self.forward_hidden(s)
        logits = HeadRows(hidden[:-1], head, self.vocab_size, block)
        ids = torch.as_tensor(s.input_ids, device=hidden.device)
        k = min(top_k, self.vocab_size)
        lps, top_ids, top_lps = [np.empty(0, np.float32)], [np.empty((0, k), np.int64)], [np.empty((0, k), np.float32)]
        for a, b in blocks(len(s), block, start=1):
            lp = self._as_scored(logits.rows(a, b)).log_softmax(-1)
            lps.append(lp.gather(-1, ids[a:b, None])[:, 0].cpu().numpy())
            i, v = topk_from_logprobs(lp, top_k)
            top_ids.append(i)
            top_lps.append(v)
            del lp
        return self._pack(s, np.concatenate(lps), np.concatenate(top_ids), np.concatenate(top_lps), logits)

    def limit_logits(self, budget: int) -> None:
        """Score longer samples in blocks (Engine.limit_logits), once a short probe shows that the output layer
        applied to the captured hidden states gives this model's own logits."""
        import torch

        probe = Sample("probe", np.arange(8, dtype=np.int64) % max(self.vocab_size, 1), np.zeros(8, np.int8))
        whole = self.forward_logits(probe)
        hidden, head = self.forward_hidden(probe)
        rebuilt = head(hidden)
        if rebuilt.shape != whole.shape or not torch.allclose(rebuilt, whole, rtol=1e-4, atol=1e-4):
            gap = (rebuilt - whole).abs().max().item() if rebuilt.shape == whole.shape else f"shape {tuple(rebuilt.shape)} vs {tuple(whole.shape)}"
            raise ValueError(
                f"engine {self.instance!r}: its logits are not its output layer applied to its last hidden states (differ by {gap}: "
                "a scaling or soft-capping after it?), so it cannot score in position chunks; unset placement.logits_budget_gb"
            )
        self.logits_budget = int(budget)

    def forward_hidden(self, sample: Sample):
        """(last hidden states [T, H], head): one forward whose output layer sees a single position; head(rows)
        gives the logits of any rows as `forward_logits` would (traits.chunks_logits)."""
        raise NotImplementedError(f"engine {self.name!r} cannot score in position chunks")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model was built for (its position table / RoPE range)."""
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def invalid(self, s: Sample, extra_tokens: int = 0) -> SampleError | None:
        """Why this engine cannot run a sample (plus `extra_tokens` to generate), or None."""
        too_big = vocab_error(s, self.vocab_size, self.instance)
        if too_big is not None:
            return too_big
        limit = self.max_positions
        if limit is not None and len(s) + extra_tokens > limit:
            return SampleError(s.sample_id, f"{len(s) + extra_tokens} tokens exceed max_position_embeddings {limit} of engine {self.instance!r}")
        if s.model_inputs.get("pixel_values") is not None and not self.is_vision:
            return SampleError(s.sample_id, f"has images but engine {self.instance!r} runs a text-only model")
        return None

    def _to_arrays(self, s: Sample, logits, top_k: int, full_vocab: bool) -> TokenLogprobs:
        import torch

        ids = torch.as_tensor(s.input_ids, device=logits.device)
        pred = logits[:-1]  # row t-1 predicts token t
        logprobs = self._as_scored(pred).log_softmax(-1)
        token_lp = logprobs.gather(-1, ids[1:, None])[:, 0].cpu().numpy()
        topk_ids, topk_lp = topk_from_logprobs(logprobs, top_k)
        return self._pack(s, token_lp, topk_ids, topk_lp, shifted_rows(pred, self.logits_as_tensors) if full_vocab else None)

    def _as_scored(self, logits):
        """The logits whose log-softmax are the scores: as they are, or as a dump's sampler processed them (`score_as`);
        full-vocabulary columns keep the raw logits."""
        return logits if self.score_as is None else processed(logits, self.score_as)

    def _pack(self, s: Sample, token_lp: np.ndarray, topk_ids: np.ndarray, topk_lp: np.ndarray, logits) -> TokenLogprobs:
        """Scores of positions 1..T-1 as TokenLogprobs: row 0 (it predicts nothing) padded, the mask this engine applied."""
        pad_row = lambda a, fill: np.concatenate([np.full((1, *a.shape[1:]), fill, a.dtype), a])  # noqa: E731
        used = {k_: v for k_, v in s.model_inputs.items() if k_ not in self.dropped_inputs}
        return TokenLogprobs(
            token_logprobs=pad_row(token_lp.astype(np.float32), np.nan),
            topk_ids=pad_row(topk_ids, -1),
            topk_logprobs=pad_row(topk_lp.astype(np.float32).reshape(-1, topk_ids.shape[1]), np.nan),
            attention=mask_kinds(self.config.model_type, s.input_ids, used),
            logits=logits,
        )

    def close(self) -> None:

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
