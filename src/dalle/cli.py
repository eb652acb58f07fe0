"""The ``dalle`` command. Each command group lives beside the code it drives and registers itself here.

A group module exposes ``register(subparsers)``, which adds its sub-commands with ``set_defaults(func=handler)``;
handlers take the parsed namespace and return an exit code (``None`` means 0). Options come from typed config
dataclasses (:mod:`dalle.config`), so every option has help text.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a machine whose cores other programs share,
# spinning threads slowed training steps and sampling 5-20x (bench/RESULTS.md); set the variable to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dalle import __version__  # noqa: E402
from dalle.errors import UserError  # noqa: E402
from dalle.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before torch's first large allocation

# Module paths, in the order the groups appear in `dalle --help` (the paper's pipeline order).
COMMAND_MODULES = [
    "dalle.commands.data",
    "dalle.commands.tokenizer",
    "dalle.commands.vae",
    "dalle.commands.train",
    "dalle.commands.plan",
    "dalle.commands.pipeline",
    "dalle.commands.reranker",
    "dalle.commands.generate",
    "dalle.commands.eval",
    "dalle.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle",
        description="DALL-E (Ramesh et al., 2021): text tokenizer, dVAE image tokenizer, sparse transformer prior, "
        "reranked sampling and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"dalle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func = getattr(args, "func", None)
    if func is None:
        # A group without a sub-command (e.g. `dalle data`) prints that group's help.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `dalle data stats ... | head`: the reader left; stop quietly like other Unix tools.
        sys.stderr.close()
        return 0


def add_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """Add a command group (``dalle NAME ...``) and return its sub-parsers; helper for command modules."""
    group = sub.add_parser(name, help=help, description=help)
    group.set_defaults(group_parser=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
