"""Watch the rollout-vs-trainer mismatch every RL step, and find the tokens behind a spike.

    from crossengine.monitor import KLMonitor

    monitor = KLMonitor("results/rl-monitor", tokenizer=tok)          # once
    metrics = monitor.step(step, gen_logprobs, train_logprobs, mask,  # every step
                           token_ids=ids, modality=is_image)
    monitor.close()

    crossengine monitor results/rl-monitor [--follow] [--step N]

Inputs are batch × tokens arrays (torch or numpy): the generator's log-prob of each sampled
token, the trainer's log-prob of the same token, and a mask of the tokens that count. The
metrics are exactly crossengine's (one implementation, crossengine.compare.frameworks), so a number
here means what it means in a run summary and in the trainer it is named after.

Per step, one row goes to DIR/steps/ and the N worst tokens (by gen_kl) to DIR/worst/, as
Parquet, written by a background thread so the trainer waits only for the arithmetic. Only
the current step's arrays are ever held.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from crossengine.columns import MODALITIES
from crossengine.compare.alarms import check, per_sample, rules, to_frame
from crossengine.compare.frameworks import framework_metrics
from crossengine.compare.keys import KEYS, framework_keys
from crossengine.compare.metrics import sampled_token_metrics
from crossengine.results import write_json, write_table

log = logging.getLogger("crossengine.monitor")

# Warn above these; NeMo-RL's docs use 1.05 for token_mult_prob_error and its CI gates
# gen_kl_error at 1e-3 … 2e-3.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "token_mult_prob_error": 1.05,
    "gen_kl_error": 1e-3,
    "policy_kl_error": 1e-3,
    "js_divergence_error": 1e-3,
}
MODALITY_NAMES = dict(enumerate(MODALITIES))  # the codes of adapters.base, as run rows use them
WORST_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("rank", pa.int32()),
        ("sample_id", pa.string()),
        ("row", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int64()),
        ("token_text", pa.string()),
        ("modality", pa.string()),
        ("lp_gen", pa.float32()),
        ("lp_train", pa.float32()),
        ("gen_kl", pa.float32()),
        ("abs_lp_diff", pa.float32()),
    ]
)


def _numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch, without importing it
        x = x.detach().double().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()  # bf16 has no numpy dtype
    return np.asarray(x)


# per-token column -> the step metric that is its token mean (the thresholded ones)
_SPLIT_MEANS = {"gen_kl": "gen_kl_error", "policy_kl": "policy_kl_error", "js": "js_divergence_error", "mult_prob_error": "token_mult_prob_error"}


def step_metrics(g: np.ndarray, t: np.ndarray, mask: np.ndarray, modality: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray]:
    """All §4b metrics of one step, the thresholded ones also by modality and first/rest token.

    Returns the metrics and the per-token gen_kl over the whole batch (NaN where masked).
    """
    valid = mask.astype(bool)
    rows = np.broadcast_to(np.arange(g.shape[0])[:, None], g.shape)[valid]
    gv, tv = g[valid], t[valid]
    tok = sampled_token_metrics(lt=tv, lg=gv)
    out: dict[str, float] = {"n_tokens": int(valid.sum())}
    out.update(framework_metrics(gv, tv, rows, tok=tok))
    first = (np.cumsum(valid, axis=1) == 1)[valid]  # the first counted (generated) token of each row
    splits: dict[str, np.ndarray] = {"first": first, "rest": ~first}
    if modality is not None:
        mod = modality[valid]
        for code, name in MODALITY_NAMES.items():
            splits[name] = mod == code
    for name, sel in splits.items():
        n = int(sel.sum())
        if n:
            out[f"{name}/n_tokens"] = n
            for column, metric in _SPLIT_MEANS.items():
                out[f"{name}/{metric}"] = float(tok[column][sel].mean())
    gen_kl = np.full(g.shape, np.nan)
    gen_kl[valid] = tok["gen_kl"]
    return out, gen_kl


class KLMonitor:
    """Per-step mismatch metrics, worst tokens, threshold warnings, optional TB/W&B logging."""

    def __init__(
        self,
        out_dir: str | Path,
        thresholds: dict[str, float] | None = None,
        alarms: dict[str, Any] | None = None,
        worst_k: int = 20,
        callback: Callable[[int, dict[str, float], list[str]], Any] | None = None,
        tokenizer: Any = None,
        tensorboard_dir: str | Path | None = None,
        wandb: bool = False,
        keys: str | None = None,
    ):
        self.dir = Path(out_dir)
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.alarm_limits = dict(alarms or {})
        self.keys = keys  # an RL framework's metric names (compare/keys.py): step() returns them too, TensorBoard/W&B log them as they are
        framework_keys({}, keys) if keys is not None else None  # an unknown framework fails here, at construction
        self.rules = list(rules(self.alarm_limits).values())  # an unknown alarm name fails here, at construction
        self.worst_k = worst_k
        self.callback = callback
        self.tokenizer = tokenizer
        self._tb = self._tensorboard(tensorboard_dir)
        self._wandb = self._wandb_module() if wandb else None
        write_json(self.dir / "monitor.json", {"thresholds": self.thresholds, "alarms": self.alarm_limits, "worst_k": worst_k})
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # a slow disk delays the trainer by at most a step
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="crossengine-monitor-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ public

    def step(self, step: int, gen_logprobs, train_logprobs, mask, token_ids=None, sample_ids=None, modality=None) -> dict[str, float]:
        """Compute, warn, hand the writes to the background thread, and return the metrics."""
        if self._error is not None:
            raise RuntimeError(f"monitor writer failed: {self._error}") from self._error
        g, t = _numpy(gen_logprobs).astype(np.float64), _numpy(train_logprobs).astype(np.float64)
        mask = _numpy(mask).astype(bool)
        if g.ndim == 1:
            g, t, mask = g[None], t[None], mask[None]
        if not (g.shape == t.shape == mask.shape):
            raise ValueError(f"gen_logprobs {g.shape}, train_logprobs {t.shape} and mask {mask.shape} must have one shape")
        modality = _numpy(modality)
        metrics, gen_kl = step_metrics(g, t, mask, modality)
        over = [k for k, limit in self.thresholds.items() if k in metrics and metrics[k] > limit]
        for k in over:
            log.warning("step %d: %s = %.6g is over its threshold %.6g", step, k, metrics[k], self.thresholds[k])
        worst = self._worst(step, g, t, gen_kl, _numpy(token_ids), sample_ids, modality)
        tripped = self._alarms(metrics, g, t, mask, sample_ids)
        for a in tripped:
            log.warning("step %d: %s", step, a.line("generator vs trainer"))
        alarms = to_frame(tripped).assign(step=step)
        if self.keys is not None:
            metrics.update({k: v for k, v in framework_keys(metrics, self.keys).items() if v is not None})
        self._queue.put((step, metrics, over, worst, alarms))
        self._log_scalars(step, metrics)
        if self.callback is not None:
            self.callback(step, metrics, over)
        return metrics

    def close(self) -> None:
        """Finish pending writes (call at the end of training; also a context manager)."""
        self._queue.put(None)
        self._writer.join()
        if self._tb is not None:
            self._tb.close()
        if self._error is not None:
            raise RuntimeError(f"monitor writer failed: {self._error}") from self._error

    def __enter__(self) -> KLMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _alarms(self, metrics: dict[str, float], g: np.ndarray, t: np.ndarray, mask: np.ndarray, sample_ids) -> list:
        """The published limits (compare/alarms.py) on this step's numbers, each with the rows that trip it alone."""
        import pandas as pd

        rows, cols = np.nonzero(mask)
        tokens = pd.DataFrame(
            {
                "sample_id": [str(sample_ids[r]) for r in rows] if sample_ids is not None else rows.astype(str),
                "segment": "completion",
                "lp_ref": t[rows, cols],
                "lp_cand": g[rows, cols],
            }
        )
        return check(metrics, per_sample(tokens), self.rules, dense=None)

    def _worst(self, step, g, t, k3, token_ids, sample_ids, modality) -> pa.Table:
        flat = np.where(np.isnan(k3), -np.inf, k3).ravel()
        n = min(self.worst_k, int(np.isfinite(flat).sum()))
        idx = np.argpartition(-flat, n - 1)[:n] if n else np.empty(0, dtype=np.int64)
        idx = idx[np.argsort(-flat[idx])]
        rows, cols = np.unravel_index(idx, g.shape)
        ids = token_ids[rows, cols].astype(np.int64) if token_ids is not None else np.full(n, -1)
        text = [self.tokenizer.decode([int(i)]) if self.tokenizer is not None and i >= 0 else None for i in ids]
        return pa.table(
            {
                "step": np.full(n, step, np.int64),
                "rank": np.arange(1, n + 1, dtype=np.int32),
                "sample_id": [str(sample_ids[r]) if sample_ids is not None else str(r) for r in rows],
                "row": rows.astype(np.int32),
                "position": cols.astype(np.int32),
                "token_id": ids,
                "token_text": text,
                "modality": [MODALITY_NAMES.get(int(modality[r, c]), "text") if modality is not None else "text" for r, c in zip(rows, cols)],
                "lp_gen": g[rows, cols].astype(np.float32),
                "lp_train": t[rows, cols].astype(np.float32),
                "gen_kl": k3[rows, cols].astype(np.float32),
                "abs_lp_diff": np.abs(g - t)[rows, cols].astype(np.float32),
            },
            schema=WORST_SCHEMA,
        )

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            step, metrics, over, worst, alarms = item
            try:
                row = {"step": step, **metrics, "over_threshold": ",".join(over), "alarms": ",".join(alarms["alarm"])}
                write_table(self.dir / "steps" / f"part-{step:08d}.parquet", pa.Table.from_pylist([row]))
                write_table(self.dir / "worst" / f"part-{step:08d}.parquet", worst)
                write_table(self.dir / "alarms" / f"part-{step:08d}.parquet", pa.Table.from_pandas(alarms, preserve_index=False))
            except BaseException as exc:  # noqa: BLE001 - surfaced on the trainer's next call
                self._error = exc

    def _log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        theirs = set(KEYS[self.keys]) if self.keys is not None else set()  # a framework's own keys go under their own names
        named = {(k if k in theirs else f"crossengine/{k}"): v for k, v in metrics.items()}
        if self._tb is not None:
            for k, v in named.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(named, step=step)

    @staticmethod
    def _tensorboard(path):
        if path is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("tensorboard_dir needs the tensorboard package (pip install tensorboard)") from exc
        return SummaryWriter(str(path))

    @staticmethod
    def _wandb_module():
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("wandb=True needs the wandb package and an active wandb.init()") from exc
        return wandb


def read_alarm_limits(out_dir: Path) -> dict[str, Any]:
    """The alarm limits a KLMonitor was given (its monitor.json); {} for the published defaults."""
    path = Path(out_dir) / "monitor.json"
    return json.loads(path.read_text()).get("alarms", {}) if path.exists() else {}


def read_thresholds(out_dir: Path) -> dict[str, float]:
    path = Path(out_dir) / "monitor.json"
    return json.loads(path.read_text())["thresholds"] if path.exists() else dict(DEFAULT_THRESHOLDS)
