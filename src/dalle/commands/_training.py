"""What the ``train`` commands share: the options of a run (fresh, or saved and overridden on ``--resume``) and the
summary printed at its end."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunOptions:
    """The loop config of a run and, on ``--resume``, the configs saved with it; options given now win."""

    def __init__(self, args: argparse.Namespace, loop_cls: type):
        from dalle.training.config import config_for_run, saved_run_config

        self.args = args
        default_out = next(f.default for f in dataclasses.fields(loop_cls) if f.name == "out")
        out = Path(getattr(args, "out", default_out))
        self.saved: dict[str, Any] | None = saved_run_config(out) if getattr(args, "resume", False) else None
        self.train = config_for_run(loop_cls, args, self.saved and self.saved["train"])

    def task(self, cls: type, key: str, prefix: str = "") -> Any:
        """The task's ``key`` section: saved values (on resume) overridden by the options given now."""
        from dalle.training.config import config_for_run

        return config_for_run(cls, self.args, self.saved and self.saved["task"][key], prefix=prefix)


def finish(result: Any, summary: Callable[[dict[str, float]], str]) -> int:
    """Print the last evaluation and where the model went; the exit code of the command (130 when interrupted)."""
    if result.eval:
        print(f"step {result.step}: {summary(result.eval)}")
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    return 130 if result.status == "interrupted" else 0
