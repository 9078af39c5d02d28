"""Storage URLs: the default one of a study, the file behind a sqlite:/// or journal:/// URL, and
where trial weights go beside it. Pure functions of the URL."""

from __future__ import annotations

from pathlib import Path


def default_url(study_name: str) -> str:
    return f"sqlite:///studies/{study_name}.db"


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL, or None for other URLs."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def journal_path(url: str) -> Path | None:
    """The log file of a journal:/// URL (Optuna's journal file storage), or None."""
    prefix = "journal:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def artifact_dir_for(storage_url: str) -> Path:
    """Where trial weights are stored: beside a SQLite/journal file, else under studies/."""
    file = sqlite_path(storage_url) or journal_path(storage_url)
    base = file.parent if file else Path("studies")
    return base / "artifacts"
