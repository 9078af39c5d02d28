"""The README's command table against the parsers: every command has a row, and each row lists
exactly the flags its parser defines (subcommands' included)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("search", "confirm", "replay", "deploy", "export", "report", "train", "summary", "space", "data", "reproduce",
            "bench", "fidelity")


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
        flags.update(option for option in action.option_strings if option.startswith("--") and option != "--help")
    return flags


def readme_rows() -> dict[str, set[str]]:
    rows = {}
    for line in README.read_text().splitlines():
        found = re.match(r"\| `python -m nas\.(\w+)` \|.*\|(.*)\|$", line)
        if found:
            rows[found.group(1)] = set(re.findall(r"--[a-z][a-z0-9-]*", found.group(2)))
    return rows


def test_every_command_has_a_row_listing_exactly_its_flags():
    rows = readme_rows()
    assert set(rows) == set(COMMANDS)
    for name in COMMANDS:
        parser = importlib.import_module(f"nas.cli.{name}").build_parser()
        assert rows[name] == parser_flags(parser), name


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 200
