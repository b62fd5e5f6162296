"""What runs inside an engine's Ray actor: the engine, and beside it the comparison of its scores.

Contract. `worker_class()` is the actor class (created lazily: importing this module needs no Ray
session). An actor is created empty (`ping`), then `load`s one engine by its registered type; the
driver (`pool.EnginePool`) then calls, per batch, `score_reference` on the reference and, on each
candidate, `score_for_compare` and `compare_scored` under one key. Three threads (Ray concurrency
groups): the default one runs everything that touches the engine, in submission order;
COMPARE_GROUP's turns scored batches into `compare.Part`s while the engine computes the next;
SERVE_GROUP's hands candidates blocks of the reference's long samples (`RemoteRows`). Exceptions
become one line naming the engine, ending with the root cause its processes printed.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from crossengine.adapters import engine_class
from crossengine.adapters.base import TokenLogprobs
from crossengine.adapters.blocks import LogitRows
from crossengine.adapters.capture import OutputCapture
from crossengine.adapters.refit import Refitter
from crossengine.adapters.sampling import Reading
from crossengine.compare.inputs import compare_inputs, own_prompt_effect
from crossengine.compare.metrics import warm_up
from crossengine.compare.noise import measure
from crossengine.compare.tokens import compare_batch, reference_check


def worker_class():
    import ray

    @ray.remote(concurrency_groups={COMPARE_GROUP: 1, SERVE_GROUP: 1}, enable_tensor_transport=True)
    class EngineWorker:
        """Hosts one engine; the adapter is imported here, in the worker's own environment.

        Created empty, so that "placed by Ray" (ping answers) and "model loaded" are two
        steps with their own timeouts: a pending actor is a placement problem, a slow load
        is not. Engine methods are forwarded by name through `call`, so a new engine method
        needs no edit here.

        Three threads: Ray's default one runs everything that touches the engine, in the order
        the driver submits it; the "compare" group's runs the metrics of a batch the engine has
        scored (`compare_scored`), so batch n is compared while the engine already computes
        batch n+1 (a candidate's metric time overlaps its forwards instead of adding to them);
        the "serve" group's hands candidates blocks of the reference's logits of long samples
        (`logit_rows`) while its engine goes on.
        """

        def __init__(self):

            self.output = OutputCapture()  # the engine's own output, for the error that names its root cause
            self.scored: dict[str, _Scored] = {}  # batch key -> what score_for_compare left for compare_scored
            self.scored_lock = threading.Lock()
            self.warming: threading.Thread | None = None  # the metric kernel's compile, beside the model's load
            self.checks: list = []  # reference checks of tensor-transported scores, for take_reference_check
            self.stopped = False  # its engine raised EngineDead (e.g. a failed refit push): no later batch runs
            self.held: dict[str, dict] = {}  # batch key -> sample id -> LogitRows of the reference's long samples, until `release`

        def _guarded(self, fn, *args):
            """fn(*args); an exception comes back as an EngineError ending with the root cause the
            engine's processes printed (vLLM's EngineCore dies with its reason on stderr)."""
            since = self.output.size()  # what this call makes the engine print; older lines are no cause of it
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - every engine failure reaches the driver as one line
                raise self.output.wrap(exc, since) from None

        def ping(self) -> int:
            return os.getpid()

        def shutdown(self) -> None:
            """Release the model and the captured output; the actor is killed next."""
            try:
                if hasattr(self, "engine"):
                    self.engine.close()
            finally:
                self.output.remove()

        def load(
            self,
            kind: str,
            spec: dict,
            model_path: str,
            instance: str,
            seed: int,
            threads: int,
            gpu_share: float | None,
            routing: bool = False,
            warm_vocab: int | None = None,
            logits_budget: int | None = None,
            score_as: dict | None = None,
        ) -> dict:
            import torch

            torch.set_num_threads(threads)
            if warm_vocab:  # this worker will compare full vocabularies: compile the kernel while the model loads
                # The compiler's packages are imported here, before its thread starts: Python's import locks
                # deadlock when two threads import one package at once and the engine's load imports it
                # too (vLLM: "_DeadlockError: deadlock detected by _ModuleLock('torch._dynamo')").
                import torch._dynamo  # noqa: F401
                import torch._inductor.compile_fx  # noqa: F401

                self.warming = threading.Thread(target=_warm_metrics, args=(warm_vocab,), daemon=True)
                self.warming.start()

            cls = engine_class(kind)
            spec = cls.Spec.model_validate(spec)
            option = cls.traits.memory_share_option
            if gpu_share is not None and option and torch.cuda.is_available():  # an engine that takes its memory up front, on a shared real GPU
                spec = spec.model_copy(update={"options": {option: gpu_share, **spec.options}})
            if score_as and cls.traits.processed_logprobs_option:  # its sampled log-probs are the processed quantity (vLLM's logprobs_mode)
                key, value = cls.traits.processed_logprobs_option
                spec = spec.model_copy(update={"options": {key: value, **spec.options}})
            self.engine = self._guarded(cls, spec, model_path, instance, seed)
            if spec.refit is not None:  # weights pushed in place per batch, fresh loads at the end (crossengine/adapters/refit.py)
                plain = spec.model_copy(update={"refit": None})
                self.engine = Refitter(self.engine, lambda path: self._guarded(cls, plain, path, instance, seed), spec.refit, model_path)
            if self.warming is not None:  # ready means ready to compare at full speed: no compile left for the first batch
                self.warming.join()
                self.warming = None
            if score_as and cls.traits.processes_logprobs:  # a dump in the run declares processed log-probs: score that quantity
                self.engine.score_as = Reading(**score_as)
            if routing:  # the experiment's `routing: true`: every score carries each MoE layer's choice
                self._guarded(self.engine.report_routing)
            if logits_budget and cls.traits.chunks_logits:  # placement.logits_budget_gb: longer samples in position blocks
                self._guarded(self.engine.limit_logits, logits_budget)
            if getattr(self, "memory", None) is None:
                self.memory = _MemoryWatch()  # from here the peak is the run's, not the load's
            return self.info()

        def timings(self) -> dict:
            """The engine's own timings, and this worker's memory (GiB, Linux) since its model loaded: what
            placement.logits_budget_gb bounds."""
            return {**self.engine.timings(), **self.memory.report()}

        def info(self) -> dict:
            info = self.engine.info()
            info.gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
            info.extra.setdefault("worker_pid", os.getpid())  # which process scored: a kept engine has the same one in every run
            return dataclasses.asdict(info)

        def call(self, method: str, *args):
            return self._guarded(getattr(self.engine, method), *args)

        @ray.method(num_returns=2)
        def score_reference(self, batch, top_k: int, full_vocab: bool, noise=None, tensors: bool = False, key: str = ""):
            """The reference's scores (an ObjectRef the candidates read, with its noise floor where `noise`
            gives conditions) and the little the driver needs of them.

            With `tensors` (called with one return and a Ray Direct Transport) its full logits stay
            torch tensors on its device and only the scores are returned: the driver takes the check
            from `take_reference_check`, since an RDT object is read by the actors it is sent to, never
            with ray.get."""

            self.engine.logits_as_tensors = tensors
            out = self._guarded(self.engine.score, batch, top_k, full_vocab)
            rows, seconds = self._floor(batch, out, noise, top_k, full_vocab)
            check = reference_check(out)
            check.noise, check.noise_s = rows, seconds
            self._hold(key, out)
            if tensors:
                self.checks.append(check)
                return out
            return out, check

        def _hold(self, key: str, out: list) -> None:
            """Keep the LogitRows of long samples here and send candidates a RemoteRows that fetches their blocks."""

            for r in out:
                if isinstance(r, TokenLogprobs) and isinstance(r.logits, LogitRows):
                    sid = str(len(self.held.setdefault(key, {})))
                    self.held[key][sid] = r.logits
                    r.logits = RemoteRows(ray.get_runtime_context().current_actor, key, sid, r.logits.shape, r.logits.block)

        @ray.method(concurrency_group=SERVE_GROUP)
        def logit_rows(self, key: str, sid: str, a: int, b: int):
            """Rows a..b-1 of a held long sample's logits, as host float32 (through the object store)."""
            return self.held[key][sid].rows(a, b).cpu().numpy()

        @ray.method(concurrency_group=SERVE_GROUP)
        def release(self, key: str) -> None:
            """The candidates have compared this batch: its held hidden states go."""
            self.held.pop(key, None)

        def take_reference_check(self):
            """The check of the oldest `score_reference(tensors=True)` not yet taken (the driver asks right after each)."""
            return self.checks.pop(0)

        def _floor(self, batch, out, noise, top_k: int, full_vocab: bool):
            """(noise.NoiseRows, seconds): this engine's own floor under its noise conditions; none without them."""

            if noise is None:
                return [], 0.0
            t = time.perf_counter()
            return self._guarded(measure, self.engine, batch, out, noise, top_k, full_vocab), time.perf_counter() - t

        def score_for_compare(self, key: str, batch, ref_out: list | None, top_k: int, full_vocab: bool, raw=None, noise=None) -> None:
            """Score a batch (and this engine's noise floor) and leave it, under `key`, for `compare_scored`.

            `ref_out` is `[ObjectRef]`: nested, so that Ray does not wait for the reference
            before this engine starts scoring; only a routing replay fetches it here. With
            `raw` (an engine with `inputs: own`) it prepares the samples itself first and compares
            its inputs with the reference's (crossengine/compare/inputs.py). Never raises: a failure is
            handed to `compare_scored`, which the driver waits on."""
            slot = self._slot(key)
            if self.stopped:  # its engine stopped on an earlier batch (said once): later batches end quietly, never fetched
                slot.done.set()
                return
            try:
                self.engine.logits_as_tensors = True  # its own logits are compared here, on its device: never copied to the host
                rows, to_score, own = self._guarded(self._own_inputs, batch, raw)
                if self.engine.spec.replays_reference_routing:  # routing replay: the reference's choices are needed before this forward
                    ref = ray.get(ref_out[0])
                    self.engine.replay_routing({s.sample_id: r.routing for s, r in zip(batch, ref) if isinstance(r, TokenLogprobs) and r.routing is not None})
                mine = self._guarded(self.engine.score, to_score, top_k, full_vocab)
                if raw is not None:
                    own_prompt_effect(rows, to_score, mine, own, self.engine)
                slot.value = (rows, mine, *self._floor(to_score, mine, noise, top_k, full_vocab))
            except BaseException as exc:  # noqa: BLE001 - reaches the driver through compare_scored
                slot.error = exc
                self.stopped = bool(getattr(exc, "dead", False))
            finally:
                slot.done.set()

        @ray.method(concurrency_group=COMPARE_GROUP)
        def compare_scored(self, key: str, batch, ref_out, options, direct: bool = False):
            """The `compare.Part` of the batch `score_for_compare` scored under `key`: compared with the
            reference's scores right here, next to this engine's logits, on the compare thread while
            the engine goes on to the next batch. `ref_out`: `[ObjectRef]` fetched from the object
            store here, or with `direct` the scores themselves, which Ray Direct Transport delivered
            as this call's argument."""

            slot = self._slot(key)
            slot.done.wait()
            with self.scored_lock:
                self.scored.pop(key, None)
            if slot.error is not None:
                raise slot.error
            if slot.value is None:  # the engine had stopped (score_for_compare)
                return None
            rows, mine, floor, seconds = slot.value
            part = compare_batch(batch, ref_out if direct else ray.get(ref_out[0]), mine, options)
            part.inputs, part.noise, part.noise_s = rows, floor, seconds
            return part

        def _slot(self, key: str) -> _Scored:
            with self.scored_lock:
                return self.scored.setdefault(key, _Scored())

        def capture(self, batch, patterns, max_positions: int, raw=None):
            """Module outputs per sample (localisation); with `raw` (an engine with `inputs: own`)
            on the samples it would score, chosen as score_for_compare chooses them."""
            return self._guarded(lambda: self.engine.capture(self._own_inputs(batch, raw)[1], patterns, max_positions))

        def _own_inputs(self, batch, raw):
            """(input rows, samples to score, own samples): without `raw` the reference's batch as is;
            with it this engine prepares its own and compares (crossengine/compare/inputs.py)."""
            if raw is None:
                return None, batch, None

            own = self.engine.prepare(raw)
            return (*compare_inputs(batch, own, self.engine), own)

    return EngineWorker


COMPARE_GROUP = "compare"  # the worker's second thread: metrics of scored batches
SERVE_GROUP = "serve"  # its third: blocks of a reference's held logits for the candidates


class RemoteRows(LogitRows):
    """A candidate's view of the reference's logits of a long sample (adapters.base.LogitRows): each block is
    fetched from the reference's worker, which computes it from the hidden states it holds until the batch
    is released; neither worker ever holds the sample's whole logits."""

    def __init__(self, actor, key: str, sid: str, shape: tuple[int, int], block: int):
        self.actor, self.key, self.sid, self.shape, self.block = actor, key, sid, shape, block

    def rows(self, a: int, b: int):
        """Rows a..b-1; the next block of the same size is requested at once, so it is computed while this one is compared."""
        import ray

        ahead = getattr(self, "ahead", None)
        ref = ahead[1] if ahead is not None and ahead[0] == (a, b) else self.actor.logit_rows.remote(self.key, self.sid, a, b)
        nxt = (b, min(self.shape[0], 2 * b - a))
        self.ahead = (nxt, self.actor.logit_rows.remote(self.key, self.sid, *nxt)) if b < self.shape[0] else None
        return ray.get(ref)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "ahead"}


def _status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class _MemoryWatch:
    """A worker's memory since its model loaded. Private memory (RssAnon: tensors, arrays, activations) is
    sampled every 10 ms, since resident size also counts the pages of Ray's object store a worker writes or
    maps, which are the node's store, not this worker's; VmHWM (reset here) gives the resident peak with them."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resident peak := now
        except OSError:
            pass
        now = _status("RssAnon", "VmRSS")
        self.base, self.rss = now.get("RssAnon"), now.get("VmRSS")
        self.peak = self.base
        if self.base is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            value = _status("RssAnon").get("RssAnon", 0)
            if value > self.peak:
                self.peak = value
            time.sleep(0.01)

    def report(self) -> dict[str, float]:
        if self.base is None:
            return {}
        gb = 2**30
        return {"rss_after_load_gb": self.rss / gb, "peak_rss_gb": _status("VmHWM").get("VmHWM", 0) / gb, "private_after_load_gb": self.base / gb, "peak_above_load_gb": (self.peak - self.base) / gb}


@dataclasses.dataclass
class _Scored:
    """One batch between a worker's two threads: set by score_for_compare, taken by compare_scored."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    value: tuple | None = None
    error: BaseException | None = None


def _warm_metrics(vocab: int) -> None:
    """Compile the full-vocabulary metric kernel (metrics.warm_up) on the side while the model loads. Imports torch
    only: transformers' lazy module must not be imported from two threads at once. Best effort: where it fails,
    the first batch compiles it or runs it eagerly."""

    try:
        warm_up(vocab)
    except Exception:  # noqa: BLE001
        pass
