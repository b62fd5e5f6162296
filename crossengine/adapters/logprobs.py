"""The `logprobs` engine: a saved dump of per-token log-probs (an RL rollout, a trainer's export) as an engine.

    engines:
      rollout: {type: logprobs, path: data/rollout.jsonl}            # the generic layout
      trainer: {type: logprobs, path: step_40/rank_0.jsonl, layout: prime-rl, fields: {logprobs: trainer_logprobs}}
    samples:
      - dump: rollout                                                # every record, scored teacher-forced by the others

It runs no model and needs no GPU: it hands over the numbers its file holds, so the other
engines can be compared with the rollout users distrust, not with a regeneration of it. It
loads the experiment model's tokenizer (never its weights) for special tokens, token texts
and the vocabulary size.

Records (JSONL lines or Parquet rows), the generic layout: `id` (string), `token_ids` (prompt and
response), `prompt_len` (the first scored position), `logprobs` (one per token from
`prompt_len` on), optional `mask` (one bool per scored token: false = not scored, e.g. a tool
output inside a multi-turn response), optional `top_ids`/`top_logprobs` (top-k per scored
token), optional `messages` and `images` (kept for people; the ids are what is scored), optional
`routed_experts` (the rollout engine's experts per input position and MoE layer, [T or T − 1][L][k]:
with `routing: true` they are this engine's routing, compared with the others' and replayed by a
`routing: replay` candidate when the dump is the reference).
`fields: {ours: theirs}` renames; `layout: prime-rl` reads prime-rl's token export (arrays
aligned with `token_ids`, scored where `loss_mask` is true, `inference_logprobs`; its id is
step/rank/export_sequence_idx). `layout: slime` reads slime/miles' `--save-debug-rollout-data` file (a
`.pt` of `Sample.to_dict()` records: `tokens`, `response_length`, `rollout_log_probs` and `loss_mask` over
the response, `rollout_routed_experts`; id: `index`), loaded with torch.load(weights_only=True).
`layout: nemo-rl` reads NeMo-RL's `train_data_step{N}.jsonl` (each value a batch of one: `token_ids`,
`generation_logprobs` and `token_loss_mask` aligned and padded, cut at `input_lengths`; id: `idx`;
`fields: {logprobs: prev_logprobs}` reads the trainer's side of the same file).

A bad record is never a silent misalignment: it is a SampleError that names FILE:LINE and the
field (its sample is skipped, listed in run.json, and the run exits 1). The driver only ever
holds record ids and byte offsets (`DumpFile.index`), reading one batch's records at a time.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from crossengine.adapters.dumps import LAYOUTS, DumpFile, Record, RecordError
from crossengine.columns import ATTENTIONS

from .base import (
    Engine,
    EngineInfo,
    EngineTraits,
    RawSample,
    Sample,
    SampleError,
    TokenLogprobs,
)
from .checkpoint import vocab_size_of
from .sampling import Reading
from .spec import EngineSpec, Strict
from .tokens import text_modality, tokenizer_fingerprint


class DumpSampling(Strict):
    """What the dump's log-probs are: the rollout's sampling parameters, and raw or processed (vLLM's `logprobs_mode`)."""

    temperature: float = Field(1.0, gt=0, description="The rollout's sampling temperature.")
    top_k: int = Field(0, ge=0, description="Its top-k (0: off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Its top-p (1: off).")
    logprobs: Literal["raw", "processed"] = Field(
        "raw", description="raw: log_softmax of the logits (vLLM's default raw_logprobs); processed: after temperature and top-k/top-p, renormalised (processed_logprobs)."
    )

    def reading(self) -> Reading:
        """The quantity the numbers are: the sampler's processing where they are processed, else raw."""
        return Reading(self.temperature, self.top_k, self.top_p) if self.logprobs == "processed" else Reading()


class LogprobsSpec(EngineSpec):
    """A dump of log-probs; `model` (the experiment's by default) gives the tokenizer only."""

    path: str = Field(description="The dump: JSONL or Parquet (.parquet), relative to the experiment file.")
    layout: Literal["generic", "prime-rl", "nemo-rl", "slime"] = Field("generic", description="Which fields hold what; docs/guides/rollout-dumps.md.")
    fields: dict[str, str] = Field(default_factory=dict, description="Renames: {our field: the dump's field}, e.g. {logprobs: trainer_logprobs}.")
    sampling: DumpSampling = Field(
        default_factory=DumpSampling,
        description="What its log-probs are (docs/guides/rollout-dumps.md#sampling-semantics): processed ones make torch scoring engines compute the same quantity; the run checks the claim.",
    )

    def named_paths(self) -> list[tuple[tuple, str]]:
        return [(("path",), self.path)]


class LogprobsEngine(Engine):
    """A dump's log-probs, by sample id; see the module docstring."""

    name = "logprobs"
    traits = EngineTraits(full_logits=False, runs_model_code=False, uses_gpu=False, has_records=True, reports_routing=True)
    routing = False  # `routing: true`: scores carry the dump's recorded expert choices
    Spec = LogprobsSpec

    def __init__(self, spec: LogprobsSpec, model_path: str, instance: str, seed: int = 0):
        super().__init__(spec, model_path, instance, seed)
        from transformers import AutoTokenizer

        self.dump = DumpFile(spec.path, spec.layout, spec.fields)
        self.by_id: dict[str, tuple[int, int]] = {}
        for rid, pointer, _ in self.dump.index():
            self.by_id.setdefault(rid, pointer)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self.vocab_size = vocab_size_of(model_path, spec.revision) or len(self.tokenizer)
        self.dump.vocab_size = self.vocab_size

    @classmethod
    def records(cls, spec: LogprobsSpec) -> DumpFile:
        """The dump, for experiments that take their samples from it (`samples: [{dump: NAME}]`)."""
        return DumpFile(spec.path, spec.layout, spec.fields)

    def info(self) -> EngineInfo:

        return EngineInfo(
            name=self.instance,
            engine=self.name,
            versions={},
            device="none (a file)",
            dtype="as recorded",
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            special_ids=list(self.tokenizer.all_special_ids),
            implementation=str(self.dump.path),
            extra={"records": len(self.by_id), "layout": self.spec.layout},
        )

    def report_routing(self) -> None:
        """The dump's own routing (generic `routed_experts`, slime's `rollout_routed_experts`); one without any says so."""
        first = next(iter(self.by_id.values()), None)
        rec = self.dump.read(first) if first is not None else None
        if rec is None or rec.routing is None:
            field = self.dump.names.get("routed_experts", "routed_experts")
            raise ValueError(f"engine {self.instance!r}: {self.dump.path} records no routing (no {field!r} in its first record): it cannot report routing")
        self.routing = True

    def _record(self, sid: str) -> Record:
        if sid not in self.by_id:
            raise SampleError(sid, f"no record with id {sid!r} in {self.dump.path} (engine {self.instance!r})")
        try:
            return self.dump.read(self.by_id[sid])
        except RecordError as exc:
            raise SampleError(sid, f"engine {self.instance!r}: {exc}") from None

    def prepare(self, raw: list[RawSample]) -> list[Sample | SampleError]:
        """As the reference: each sample is its record's token ids (text samples cannot be prepared here)."""
        out: list[Sample | SampleError] = []
        for r in raw:
            try:
                rec = self._record(r.id)
                if r.token_ids is not None and list(r.token_ids) != rec.token_ids.tolist():
                    raise SampleError(r.id, f"{rec.where}: token_ids differ from the experiment's token_ids for this id")
                ids = rec.token_ids
                out.append(Sample(r.id, ids, text_modality(ids, self.tokenizer.all_special_ids, None), prompt_len=rec.prompt_len))
            except SampleError as err:
                out.append(err)
        return out

    def score(self, samples, top_k: int, full_vocab: bool) -> list[TokenLogprobs | SampleError]:
        out: list[TokenLogprobs | SampleError] = []
        for s in samples:
            if isinstance(s, SampleError):
                out.append(s)
                continue
            try:
                out.append(self._scores(s))
            except SampleError as err:
                out.append(err)
        return out

    def _scores(self, s: Sample) -> TokenLogprobs:
        rec = self._record(s.sample_id)
        if len(rec.token_ids) != len(s) or not np.array_equal(rec.token_ids, s.input_ids):
            diff = next((i for i, (a, b) in enumerate(zip(rec.token_ids, s.input_ids)) if a != b), min(len(rec.token_ids), len(s)))
            raise SampleError(s.sample_id, f"{rec.where}: {self.dump.names['token_ids']}: differ from the scored tokens at position {diff} ({len(rec.token_ids)} tokens in the dump, {len(s)} scored)")
        if s.prompt_len is not None and s.prompt_len != rec.prompt_len:
            raise SampleError(s.sample_id, f"{rec.where}: prompt_len {rec.prompt_len} differs from the sample's prompt_len {s.prompt_len}")
        n = len(s)
        top_ids, top_lp = rec.top_ids, rec.top_logprobs
        if top_ids is None:  # no top-k in the dump: top-1 and top-k columns are null for this side
            top_ids, top_lp = np.full((n, 1), -1, np.int64), np.full((n, 1), np.nan, np.float32)
        out = TokenLogprobs(rec.logprobs, top_ids, top_lp, attention=np.full(n, ATTENTIONS.index("causal"), np.int8), scored=rec.scored)
        if self.routing:
            if rec.routing is None:
                raise SampleError(s.sample_id, f"{rec.where}: {self.dump.names['routed_experts']}: missing, and the run reads routing (`routing: true`)")
            out.routing, out.router_margin = rec.routing, np.full(rec.routing.shape[:2], np.nan, np.float32)  # a dump records choices, not router logits
        return out

    def token_texts(self) -> list[str]:
        n = max(len(self.tokenizer), self.vocab_size)
        return [self.tokenizer.decode([i]) for i in range(n)]


__all__ = ["DumpFile", "LogprobsEngine", "LogprobsSpec", "Record", "RecordError", "LAYOUTS"]
