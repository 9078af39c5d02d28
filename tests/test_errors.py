"""nas's errors are one family: every error class nas defines is a NasError (one deliberate
exception, StorageUnavailable), the commands catch that family and nothing broader, and a bug
raised while a command sets up escapes it as itself, with its traceback, never as an `error:` line."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nas.data
from nas.cli import bench, data as data_command, reproduce, search, train
from nas.errors import NasError, OutputError, writing
from nas.storage.outage import StorageUnavailable
from tests.test_layout import PACKAGE, modules

REPO_ROOT = PACKAGE.parent
# Too broad for a command to catch: each would turn a bug into a tidy line.
BROAD = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError", "TypeError", "KeyError",
         "IOError", "EnvironmentError"}


def error_classes() -> dict[str, type]:
    """Every exception class a nas module defines, by qualified name."""
    found = {}
    for name in modules():
        if name.endswith("__main__"):
            continue  # a shim runs its command on import
        for value in vars(importlib.import_module(name)).values():
            if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name):
                found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_public_error_class_of_nas_is_a_nas_error():
    classes = error_classes()
    assert len(classes) >= 14  # the 13 the package had before the family, and NasError itself
    outside = {name for name, cls in classes.items()
               if not issubclass(cls, NasError) and not cls.__name__.startswith("_")}
    # It must get through Optuna's trial loop and a heartbeat thread, which swallow any Exception.
    assert outside == {"nas.storage.outage.StorageUnavailable"}
    assert issubclass(StorageUnavailable, SystemExit)


def broad_handlers(path: Path) -> list[str]:
    """`line: names` of each except clause in `path` that names a class in BROAD (or is bare)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler):
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {"(bare)" if c is None else ast.unparse(c).rpartition(".")[2] for c in caught}
            if names & (BROAD | {"(bare)"}):
                found.append(f"{node.lineno}: {', '.join(sorted(names))}")
    return found


def test_the_commands_catch_no_broad_exception():
    offenders = {str(path.relative_to(REPO_ROOT)): broad_handlers(path)
                 for path in sorted((PACKAGE / "cli").glob("*.py")) if broad_handlers(path)}
    assert offenders == {}


def test_the_handler_finder_finds_broad_handlers(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(textwrap.dedent("""
        try:
            pass
        except (KeyError, nas.errors.NasError):
            pass
        except builtins.OSError:
            pass
        except NasError:
            pass
        except:
            pass
    """))
    assert broad_handlers(path) == ["4: KeyError, NasError", "6: OSError", "10: (bare)"]


def boom(*args, **kwargs):
    raise RuntimeError("injected bug")


# Each command with the nas.data function it calls while it sets up, and arguments that reach it.
SETUPS = {
    "reproduce": (reproduce.main, "prepare", ["--models", "m1", "--seeds", "1", "--epochs", "1", "--quiet"]),
    "search": (search.main, "open_data", ["--trials", "1", "--epochs", "1", "--quiet"]),
    "train": (train.main, "open_data", ["--epochs", "1", "--quiet"]),
    "bench": (bench.main, "load_mnist", ["--quick", "--batches", "1"]),
    "data": (data_command.main, "prepare", []),
}


@pytest.mark.parametrize("command", sorted(SETUPS))
def test_a_bug_during_setup_escapes_the_command_as_itself(command, monkeypatch, tmp_path, capsys):
    main, function, argv = SETUPS[command]
    monkeypatch.setattr(nas.data, function, boom)
    monkeypatch.chdir(tmp_path)  # whatever a command writes by default lands here
    flags = ["--data-dir", str(tmp_path / "data")]
    if command == "search":
        flags += ["--storage", f"sqlite:///{tmp_path / 's.db'}"]
    if command == "reproduce":
        flags += ["--out", str(tmp_path / "out")]
    with pytest.raises(RuntimeError, match="injected bug"):
        main(argv + flags)
    assert "error:" not in capsys.readouterr().err


def test_the_bug_reaches_the_user_as_a_traceback(tmp_path):
    """As a user sees it: `python -m nas.reproduce` with a bug in nas.data prints the traceback and
    exits 1, Python's own way, and no `error:` line."""
    script = textwrap.dedent(f"""
        import runpy, sys
        import nas.data

        def prepare(*args, **kwargs):
            raise RuntimeError("injected bug")

        nas.data.prepare = prepare
        sys.argv = ["nas.reproduce", "--quiet", "--data-dir", {str(tmp_path)!r}, "--out", {str(tmp_path / 'o')!r}]
        runpy.run_module("nas.reproduce", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("RuntimeError: injected bug")
    assert "error:" not in done.stderr


def test_a_user_mistake_is_still_one_line(tmp_path, capsys):
    assert reproduce.main(["--models", "m9", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --models: unknown m9; choose from model1, model2, model3 (or m1, m2, m3)\n"


def test_writing_turns_an_os_error_into_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"^cannot write the report into .*: Not a directory$"):
        with writing(f"the report into {blocker / 'sub'}"):
            (blocker / "sub").mkdir()
    with pytest.raises(ZeroDivisionError):  # anything else is not the user's to fix, and rises as itself
        with writing("x"):
            1 / 0
