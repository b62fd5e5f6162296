"""The one interface every engine implements; the core knows nothing else about engines.

Imported as `crossengine.adapters.base`. Engines live one per file beside this one and are
imported lazily, by the registry in `crossengine.adapters`, inside the Ray worker that runs
them, so importing crossengine never imports vLLM or a native training stack.

A worked example (tiny-text, `top_k=2`), for the token ids of "<bos> The fox":

    input_ids        = [1, 357, 486]              # position 0 is never scored
    token_logprobs   = [nan, -2.31, -0.42]        # log p(357 | 1), log p(486 | 1 357)
    topk_ids[1]      = [357, 36]                  # the engine's two best at position 1
    topk_logprobs[1] = [-2.31, -2.97]
    logits           = float32 [3, 512] or None   # full vocabulary, where cheap (HF, native)

Row t holds the prediction *for* token t, made from tokens < t; row 0 is padding, so
every array is indexed by the position of the token it scores.

What an engine can do is declared once, as its `traits` (EngineTraits below), and what it
takes in the experiment file as its `Spec` (crossengine/adapters/spec.py). Placement, the pool,
preflight, localisation, the plan and the runner read those two and never an engine's name,
so a new engine is one file plus a registry line (or an entry point, or `type: module:Class`).
"""

from __future__ import annotations

import abc
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .spec import EngineSpec


@dataclass
class RawSample:
    """A sample as the experiment gives it, before the reference prepares it: text (with image
    placeholders where it has images) or token ids; `max_length` truncates."""

    id: str
    text: str | None = None
    images: list[str] = field(default_factory=list)
    token_ids: list[int] | None = None
    max_length: int | None = None
    messages: list[dict[str, Any]] | None = None  # chat turns: {role, content: str | [{type: text, text} | {type: image, path}]}
    rendered: bool = False  # `text` is a chat template's output: tokenised without adding special tokens
    prompt_len: int | None = None  # token_ids only: where the response starts (a saved rollout's records say)


@dataclass
class Sample:
    """One prompt as every engine sees it: token ids expanded once, by the reference engine."""

    sample_id: str
    input_ids: np.ndarray  # int64 [T]
    modality: np.ndarray  # int8 [T], index into MODALITIES
    text: str | None = None
    images: list[str] = field(default_factory=list)
    # Extra model inputs made by the reference processor (pixel_values, token_type_ids, ...).
    model_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # Tokens appended by a generator, scored teacher-forced (generation mode); the prompt
    # is input_ids[:prompt_len].
    prompt_len: int | None = None
    rendered: bool = False  # `text` came from a chat template (which wrote any BOS itself)
    # The model inputs as they reach the preparing engine's model, where that differs from
    # `model_inputs` (dropped, normalised on the device, a native model's own view); inputs.py
    input_view: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TokenLogprobs:
    """An engine's teacher-forced scores for one sample; arrays, never per-token objects."""

    token_logprobs: np.ndarray  # float32 [T], nan at position 0
    topk_ids: np.ndarray  # int64 [T, k]
    topk_logprobs: np.ndarray  # float32 [T, k]
    attention: np.ndarray  # int8 [T], index into ATTENTIONS: the mask this engine applied
    logits: np.ndarray | None = None  # float32 [T, V], raw logits where the engine gives them cheaply
    scored_ids: np.ndarray | None = None  # ids the engine actually scored, when it expanded them itself
    logits_are_logprobs: bool = False  # `logits` holds log-probs (vLLM's full distribution), not raw logits
    scored: np.ndarray | None = None  # bool [T]: the positions this side has a number for (a dump scores its responses); None: all from 1
    noise: np.ndarray | None = None  # float32 [T]: this engine's own floor, max |Δlp| between its noise conditions (crossengine/compare/noise.py)
    noise_kl: np.ndarray | None = None  # float32 [T]: max KL(base ‖ condition) over those conditions, where it gives full logits
    routing: np.ndarray | None = None  # int16 [T, L, k]: the experts each MoE layer chose for each input position (`routing: true`; crossengine/adapters/routing.py)
    router_margin: np.ndarray | None = None  # float32 [T, L]: router logit of the k-th choice minus the (k+1)-th

    @property
    def full_vocab(self) -> bool:
        return self.logits is not None


@dataclass
class Generation:
    """Tokens an engine sampled after a prompt, with its own log-prob of each."""

    sample_id: str
    completion_ids: np.ndarray  # int64 [G]
    token_logprobs: np.ndarray  # float32 [G]
    topk_ids: np.ndarray  # int64 [G, k]
    topk_logprobs: np.ndarray  # float32 [G, k]


@dataclass
class EngineInfo:
    """What an engine's worker reports of itself (run.json's `engines`); the fields the core reads are typed, `extra` is for people."""

    name: str
    engine: str
    versions: dict[str, str]
    device: str
    dtype: str
    tokenizer_fingerprint: str | None = None
    special_ids: list[int] = field(default_factory=list)  # the reference's give the `special` modality
    implementation: str | None = None  # which code runs the model where the type does not say (native: olmo-core or the factory)
    gpu_ids: list[str] = field(default_factory=list)  # the GPUs Ray gave the worker (set by the pool)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineTraits:
    """What an engine can do. The core reads these, never the engine's name.

    Every field has the default of the most limited engine, so a new engine declares only
    what it can do; `check_traits` (run by the registry) rejects inconsistent declarations.
    """

    full_logits: bool = True  # gives full-vocabulary logits cheaply (hf, native); False: top-k log-probs only
    full_logits_option: str | None = None  # ... unless this boolean field of its Spec is set (vllm: full_vocab)
    memory_share_option: str | None = None  # takes its GPU memory up front; told its share of a shared GPU through this loader option (vllm: gpu_memory_utilization)
    loads_first: bool = False  # where engines share a GPU it loads before the others (it allocates up front)
    needs_kv_cache: bool = False  # needs memory beyond its weights: placement adds placement.vllm_kv_cache_gb
    expands_images: bool = False  # expands image placeholders itself from text + images; cannot prepare image prompts for others
    captures_modules: bool = False  # `capture` gives module outputs (localisation)
    audits_buffers: bool = False  # `audit` checks registered buffers against a fresh construction
    lora: bool = False  # takes a LoRA adapter (`lora:`)
    runs_model_code: bool = True  # builds the model from the checkpoint's own classes: remote code needs trust_remote_code
    environment_hint: str | None = None  # it usually runs in its own Python environment; how to build one (said when env.python is missing)
    uses_gpu: bool = True  # on a GPU cluster it asks for one GPU unless num_gpus says otherwise; False: never (a file of numbers)
    has_records: bool = False  # holds samples of its own: `samples: [{dump: NAME}]` takes them (`Engine.records`)
    reports_routing: bool = False  # `routing: true` gives each MoE layer's expert choice (`Engine.report_routing`)
    replays_routing: bool = False  # routes with another engine's expert choice (`Engine.replay_routing`; its Spec's `replays_reference_routing`)
    batching: bool = False  # its Spec has the run conditions batching/padding_side/micro_batch_size, read at every `score` call (the noise floor switches them)
    tensor_logits: bool = False  # keeps full logits as torch tensors on its device when `Engine.logits_as_tensors` is set (Ray Direct Transport moves them)
    processes_logprobs: bool = False  # scores a sampler's processed log-probs when `Engine.score_as` says so (temperature, top-k, top-p)
    processed_logprobs_option: tuple[str, str] | None = None  # ... or, as a generator, is told so at load by this loader option and value (vllm: logprobs_mode)
    refits: bool = False  # takes new weights in place (`refit:`): Engine.load_weights, parameters, reset_prefix_cache
    chunks_logits: bool = False  # with `Engine.limit_logits(bytes)`, a longer sample's logits come as a LogitRows, computed a block of positions at a time

    def gives_full_logits(self, spec: Any) -> bool:
        """Whether an engine with this spec hands over full-vocabulary logits."""
        return self.full_logits or bool(self.full_logits_option and getattr(spec, self.full_logits_option, False))


def check_traits(cls: type) -> str | None:
    """Why an engine class cannot run (one line), or None: a subclass of Engine with EngineTraits and a Spec model whose fields match them."""

    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        return f"{cls!r} is not a subclass of crossengine.adapters.base.Engine"
    if not isinstance(getattr(cls, "traits", None), EngineTraits):
        return f"{cls.__name__}.traits is not a crossengine.adapters.base.EngineTraits"
    spec = getattr(cls, "Spec", None)
    if not (isinstance(spec, type) and issubclass(spec, EngineSpec)):
        return f"{cls.__name__}.Spec is not a subclass of crossengine.adapters.spec.EngineSpec"
    t = cls.traits
    if t.full_logits_option and (t.full_logits or t.full_logits_option not in spec.model_fields):
        return f"{cls.__name__}.traits.full_logits_option {t.full_logits_option!r} must be a field of {spec.__name__}, with full_logits=False"
    if t.batching and not {"batching", "padding_side", "micro_batch_size"} <= set(spec.model_fields):
        return f"{cls.__name__}.traits.batching needs the fields batching, padding_side and micro_batch_size in {spec.__name__} (crossengine/adapters/torch_engine.py TorchSpec has them)"
    if t.loads_first and not t.memory_share_option:
        return f"{cls.__name__}.traits.loads_first needs memory_share_option (the option that tells it its share)"
    return None


# blocks of logits a candidate's worker may hold at once: on its main thread the next batch's scoring (a block and
# its log-softmax), on its compare thread its own block and the reference's (one more prefetched), and slack for the
# allocator and the kernel (measured: 6 blocks' worth peaks at 93 % of the budget, tests/test_scale.py)
CHUNK_COPIES = 8


class SampleError(ValueError):
    """A problem with one sample that the run reports and skips, e.g. a prompt too long."""

    def __init__(self, sample_id: str, message: str, detail: str | None = None):
        super().__init__(f"sample {sample_id}: {message}")
        self.sample_id = sample_id
        self.message = message
        self.detail = detail  # a traceback, for the run's log file; never printed whole

    def __reduce__(self):  # crosses Ray's process boundary intact
        return (SampleError, (self.sample_id, self.message, self.detail))

    @classmethod
    def from_exception(cls, sample_id: str, engine: str, exc: BaseException) -> SampleError:
        """An unexpected exception while running one sample: one line, traceback kept aside."""

        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        msg = f"engine {engine!r} raised {type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
        return cls(sample_id, msg, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class EngineDead(RuntimeError):
    """The engine's own process is gone (vLLM's EngineCore, a server it talks to): no later sample
    can run. An adapter raises it instead of blaming each sample; the run then stops that engine
    once, naming it, the batch and the cause, and lets the other engines finish."""


class EngineError(RuntimeError):
    """An engine's failure with what its process printed last (`output`, for the run's log): its
    message ends with the root cause found there, e.g. vLLM EngineCore's own RuntimeError."""

    def __init__(self, message: str, output: str = "", dead: bool = False):
        super().__init__(message)
        self.output, self.dead = output, dead

    def __reduce__(self):  # crosses Ray's process boundary intact
        return (EngineError, (str(self), self.output, self.dead))


class Engine(abc.ABC):
    """Load a model once, then score or generate batches of samples.

    Implementations take their options from `spec`, an instance of their `Spec` model
    (crossengine/adapters/spec.py), declare what they can do as `traits`, and must be deterministic for
    a fixed seed. They should free device memory in `close()`. A method an engine's traits say
    it lacks (capture, audit, generate, prepare) keeps the default that raises.
    """

    name: str = "engine"
    traits: EngineTraits = EngineTraits()
    Spec: type = None  # type: ignore[assignment] - the engine's pydantic options model (crossengine/adapters/spec.py); set by each engine
    logits_as_tensors: bool = False  # set by the worker (traits.tensor_logits): `TokenLogprobs.logits` a torch tensor on the engine's device, not host numpy
    logits_budget: int | None = None  # bytes of full logits its worker may hold at once (`limit_logits`, traits.chunks_logits)
    score_as: Any = None  # adapters.sampling.Reading: the processed quantity a dump in the run declares (traits.processes_logprobs)

    def __init__(self, spec: Any, model_path: str, instance: str, seed: int = 0):
        self.spec = spec
        self.model_path = model_path
        self.instance = instance  # the experiment's name for this engine or variant
        self.seed = seed

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """Library versions, device and dtype as this worker sees them (go into run.json)."""

    def prepare(self, raw: list[RawSample]) -> list[Sample | SampleError]:
        """Tokenise and expand prompts, one batch at a time; only the reference engine is asked to."""
        raise NotImplementedError(f"engine {self.name!r} cannot be the reference that tokenises samples")

    @abc.abstractmethod
    def score(self, samples: list[Sample | SampleError], top_k: int, full_vocab: bool) -> list[TokenLogprobs | SampleError]:
        """Teacher-forced log-probs of every position; a failing sample yields a SampleError.

        `samples` is what the reference's `prepare` returned, SampleErrors included (they go
        straight from its worker to every engine's, never through the driver): return each
        SampleError in its place."""

    def generate(self, samples: list[Sample], sampling: Any, top_k: int) -> list[list[Generation] | SampleError]:
        """`sampling.n` completions per sample, each with the engine's raw log-prob of every token."""
        raise NotImplementedError(f"engine {self.name!r} does not generate")

    def timings(self) -> dict[str, float]:
        """Engine-side timings worth reporting (e.g. vLLM's output unpacking)."""
        return {}

    def capture(self, samples: list[Sample], patterns: list[str] | None) -> list[list[tuple[str, np.ndarray]]]:
        """Per sample, the outputs [T, H] of the modules matching `patterns`, in forward order."""
        raise NotImplementedError(f"engine {self.name!r} does not expose its modules")

    def audit(self, against: str | None = None) -> list[dict[str, Any]]:
        """Every registered buffer checked against a fresh construction (crossengine/adapters/inspect.py); an engine that
        can also reads its parameters against checkpoint `against` (the reference's model)."""
        raise NotImplementedError(f"engine {self.name!r} does not expose its buffers")

    def report_routing(self) -> None:
        """From now on, every score carries `routing` and `router_margin` (a MoE model; traits.reports_routing)."""
        raise NotImplementedError(f"engine {self.name!r} cannot report routing")

    def replay_routing(self, routing: dict[str, np.ndarray]) -> None:
        """Route the next scores' samples (by id) with these expert choices [T, L, k] instead of its own (traits.replays_routing)."""
        raise NotImplementedError(f"engine {self.name!r} cannot replay routing")

    def _block_rows(self, tokens: int) -> int | None:
        """Rows of logits per block where a sample of `tokens` (of `self.vocab_size`) exceeds `logits_budget`, else None
        (whole logits). A worker holds fewer than CHUNK_COPIES blocks at once (see there)."""
        if self.logits_budget is None or tokens * self.vocab_size * 4 <= self.logits_budget:
            return None
        return max(2, self.logits_budget // (CHUNK_COPIES * 4 * self.vocab_size))

    def limit_logits(self, budget: int) -> None:
        """From now on a sample whose full logits exceed `budget` bytes is scored in position blocks and its
        `TokenLogprobs.logits` is a LogitRows (traits.chunks_logits); raises where this model's logits cannot be
        reproduced that way."""
        raise NotImplementedError(f"engine {self.name!r} cannot score in position chunks")

    def load_weights(self, weights: list) -> None:
        """Write (checkpoint name, torch tensor) pairs into the live model in place, as an RL trainer's sync does (traits.refits)."""
        raise NotImplementedError(f"engine {self.name!r} cannot take new weights in place")

    def parameters(self):
        """(name, host torch tensor) of every parameter it holds that can be read back, in the engine's own names (refit's audit)."""
        raise NotImplementedError(f"engine {self.name!r} does not expose its parameters")

    def reset_prefix_cache(self) -> None:  # noqa: B027 (no cache by default)
        """Forget cached state computed with earlier weights (vLLM's prefix cache); after every refit push unless told not to."""

    def probe_cached(self, samples: list[Sample]) -> list[tuple[int, float] | None] | None:
        """Per sample, (token, log-prob) of the greedy next token through the engine's prefix cache, as a rollout reads
        it; None for an engine without one. Refit compares it with a fresh load's to find stale cached state."""
        return None

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release the model (and device memory) before the worker exits."""

    @classmethod
    def records(cls, spec: Any):
        """Where an engine with `traits.has_records` keeps its samples: an object with `index()` ->
        (id, pointer, where) in file order and `read(pointer)` -> a record with `token_ids`,
        `prompt_len`, `where` (raising ValueError naming file:line and field). The driver holds
        only ids and pointers, reading a batch's records when it runs."""
        raise NotImplementedError(f"engine {cls.name!r} holds no samples of its own")

    def token_texts(self) -> list[str]:
        """Readable text of every token id, for the token_text column (asked of the reference)."""
        tok = self.tokenizer  # type: ignore[attr-defined]
        n = max(len(tok), self.vocab_size)  # type: ignore[attr-defined]
        return [tok.decode([i]) for i in range(n)]
