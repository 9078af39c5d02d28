"""nas.storage.urls: pure functions of a storage URL, no database touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from nas.storage.urls import artifact_dir_for, default_url, journal_path, sqlite_path


def test_a_study_is_stored_by_default_in_its_own_sqlite_file_under_studies():
    assert default_url("mnist-8k") == "sqlite:///studies/mnist-8k.db"
    assert sqlite_path(default_url("mnist-8k")) == Path("studies/mnist-8k.db")


@pytest.mark.parametrize("url, path", [
    ("sqlite:///studies/s.db", Path("studies/s.db")),  # relative to the working directory
    ("sqlite:////srv/nas/s.db", Path("/srv/nas/s.db")),  # four slashes: absolute
    ("sqlite:///s.db", Path("s.db")),
])
def test_the_file_of_a_sqlite_url(url, path):
    assert sqlite_path(url) == path
    assert journal_path(url) is None


@pytest.mark.parametrize("url, path", [
    ("journal:///studies/s.log", Path("studies/s.log")),
    ("journal:////srv/nas/s.log", Path("/srv/nas/s.log")),
])
def test_the_file_of_a_journal_url(url, path):
    assert journal_path(url) == path
    assert sqlite_path(url) is None


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://nas@db:5432/nas",
    "mysql://nas@db/nas",
    "sqlite://",  # SQLite in memory: no file
    "journal://s.log",  # two slashes: not a journal file URL
    "studies/s.db",  # a path, not a URL
])
def test_other_urls_have_no_file(url):
    assert sqlite_path(url) is None
    assert journal_path(url) is None


@pytest.mark.parametrize("url, directory", [
    ("sqlite:///studies/s.db", Path("studies/artifacts")),
    ("sqlite:////srv/nas/s.db", Path("/srv/nas/artifacts")),
    ("sqlite:///s.db", Path("artifacts")),  # beside a file in the working directory
    ("journal:////srv/nas/s.log", Path("/srv/nas/artifacts")),
    ("postgresql+psycopg://nas@db:5432/nas", Path("studies/artifacts")),  # no file to sit beside
])
def test_trial_weights_go_beside_the_database_file_else_under_studies(url, directory):
    assert artifact_dir_for(url) == directory
