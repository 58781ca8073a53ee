"""Metrics a person can read: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard
events under `tensorboard/<stage>/` (`tensorboard --logdir WORKDIR/tensorboard`), and a progress line."""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import jax
from etils import epath  # local paths and gs:// alike

from lalign import log


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_records(workdir: str) -> list[dict]:
    """Every record of `workdir/metrics.jsonl` in order (none without the file); a line cut short by a kill is
    skipped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class MetricWriter:
    """Appends to `workdir/metrics.jsonl`, writes each numeric value as a TensorBoard scalar `stage/name`
    (tensorboardX's writer; a workdir it cannot write to gets one note and the JSON lines only), and prints
    `[stage] step 120/1000 | loss 0.1234 | ... | ETA 3m12s`.

    images/s is measured between consecutive `log_train` calls (the first interval includes compilation, so it
    is reported but not used for the ETA). On a multi-host run only process 0 writes and prints.
    """

    def __init__(self, workdir: str, stage: str, total_steps: int, batch_size: int, quiet: bool = False):
        self.primary = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        if self.primary:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage, self.total_steps, self.batch_size, self.quiet = stage, total_steps, batch_size, quiet
        self._last: Optional[tuple[int, float]] = None
        self._rate: Optional[float] = None
        self._tb, self._tb_dir = None, str(epath.Path(workdir) / "tensorboard" / stage)

    def write(self, step: int, **metrics) -> dict:
        record = {"stage": self.stage, "step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.primary:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self._scalars(int(step), record)
        return record

    def resume_at(self, step: int) -> int:
        """A run resumed from its checkpoint of `step` logs the steps after it again: drops this stage's records
        past `step` (written before the restart), so that metrics.jsonl holds each step once. Returns how many."""
        if not self.primary or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the kill
                dropped += 1
                continue
            if record.get("stage") == self.stage and int(record.get("step", -1)) > step:
                dropped += 1
            else:
                keep.append(line)
        if dropped:
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        return dropped

    def _scalars(self, step: int, record: dict) -> None:
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter  # heavy, and optional at run time: see the except

                self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
            except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience beside metrics.jsonl
                self._tb = False
                log.info(f"[{self.stage}] TensorBoard events not written ({type(e).__name__}: {e}); metrics.jsonl has "
                     f"every value")
        if not self._tb:
            return
        for k, v in record.items():
            if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        self._tb.flush()  # a run that is killed keeps every logged value

    def close(self) -> None:
        """Flushes the TensorBoard events (metrics.jsonl is written line by line)."""
        if self._tb:
            self._tb.close()
        self._tb = None

    def log_train(self, step: int, **metrics) -> dict:
        now = time.time()
        if self._last is not None and step > self._last[0]:
            steps_per_s = (step - self._last[0]) / max(now - self._last[1], 1e-9)
            metrics["images_per_s"] = steps_per_s * self.batch_size
            if self._last[0] > 1 or self._rate is not None:
                self._rate = steps_per_s
        self._last = (step, now)
        record = self.write(step, **metrics)
        if not self.quiet and self.primary:
            eta = (self.total_steps - step) / self._rate if self._rate else float("nan")
            parts = [f"[{self.stage}] step {step}/{self.total_steps}"]
            parts += [f"{k} {_short(v)}" for k, v in record.items() if k not in ("stage", "step")]
            parts.append(f"ETA {format_duration(eta)}")
            log.info(" | ".join(parts))
        return record

    def reset_clock(self):
        """Call after a pause (evaluation, checkpointing) so it does not count against images/s."""
        if self._last is not None:
            self._last = (self._last[0], time.time())


def _plain(v):
    try:
        return float(v) if not isinstance(v, (str, int)) else v
    except TypeError:
        return str(v)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
