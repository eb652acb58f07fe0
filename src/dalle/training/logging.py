"""Where training metrics go: CSV files in the run directory (always) and TensorBoard (when it is installed).

``RUN/metrics.csv`` holds the training rows (every ``log_every`` steps), ``RUN/eval.csv`` the evaluation rows. A resumed
run first drops the rows written after the checkpoint it resumes from, so that the files read as if the run had never
stopped.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CSVLog:
    """Append-only CSV with a ``step`` column; new metric names widen the header (the file is rewritten once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.columns: list[str] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), [])

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Drop rows with a step beyond ``step`` (written by a session that ended after its last checkpoint)."""
        rows = self.rows()
        kept = [r for r in rows if int(r["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite(self.columns, kept)

    def append(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        missing = [k for k in row if k not in self.columns]
        if missing:
            self._rewrite(self.columns + missing if self.columns else list(row), self.rows())
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
            f.flush()

    def _rewrite(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


class MetricsWriter:
    """CSV logs plus an optional TensorBoard writer (``torch.utils.tensorboard`` needs the ``tensorboard`` package)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        run_dir = Path(run_dir)
        self.train = CSVLog(run_dir / "metrics.csv")
        self.eval = CSVLog(run_dir / "eval.csv")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard is not installed: metrics go to CSV only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def resume_at(self, step: int) -> None:
        self.train.truncate_after(step)
        self.eval.truncate_after(step)
        if self.tb is not None:
            from torch.utils.tensorboard.summary import Event, SessionLog

            # TensorBoard hides the events of the abandoned steps after a "START" event at the resumed step.
            self.tb.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        (self.eval if split == "eval" else self.train).append(step, values)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_metrics(values: dict[str, float], keys: list[str] | None = None) -> str:
    """``name=value`` pairs with 4 significant digits, for progress bars and log lines."""
    keys = keys if keys is not None else list(values)
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
