"""Argument parsing shared by the command-line entry points."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """A user's mistake on the command line is one `error:` line and exit status 2;
    argparse's own would print the whole usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
