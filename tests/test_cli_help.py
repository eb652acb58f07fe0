"""Every command's ``--help`` prints its options: the README promises it, and argparse formats help text with ``%``,
so one literal percent sign in an option's help would turn ``--help`` into a traceback."""

import argparse

import pytest

from dalle.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


def test_the_walk_finds_every_command_group():
    assert {("pipeline",), ("train",), ("vae", "train"), ("data", "stats"), ("serve",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "dalle")
def test_help_of_every_command_prints(path):
    parser = dict(_commands(build_parser()))[path]
    text = parser.format_help()  # what --help prints; raises on a bad % in any option's help
    assert text.startswith("usage: dalle")
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS) and action.option_strings:
            assert action.option_strings[-1] in text


def test_a_percent_sign_in_help_text_is_printed_as_is():
    text = dict(_commands(build_parser()))[("pipeline",)].format_help()
    assert "%" in " ".join(text.split())  # the time budget's shares, e.g. "45%"
