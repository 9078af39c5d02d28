"""docker-compose.yml and the Dockerfile agree with the CLI. Docker can't run here; the topology
itself (workers sharing a PostgreSQL study) is exercised for real in test_workers.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from nas.search import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent


def with_defaults(value):
    """What compose makes of ${VAR:-default} with nothing set in the environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", value).replace("$$", "$")
    if isinstance(value, list):
        return [with_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: with_defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose():
    return with_defaults(yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text()))


def test_services(compose):
    assert set(compose["services"]) == {"postgres", "dashboard", "worker"}
    postgres = compose["services"]["postgres"]
    assert "healthcheck" in postgres and "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    for name in ("dashboard", "worker"):
        assert compose["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_nothing_listens_beyond_localhost_by_default(compose):
    assert "ports" not in compose["services"]["postgres"]
    assert "ports" not in compose["services"]["worker"]  # workers scale: no fixed ports
    for mapping in compose["services"]["dashboard"]["ports"]:
        assert mapping.startswith("127.0.0.1:")


def test_worker_runs_the_search_cli_on_the_postgres_service(compose):
    command = compose["services"]["worker"]["command"]
    assert command[:3] == ["python", "-m", "nas.search"]
    args = build_parser().parse_args(command[3:])  # exits on any flag the CLI doesn't know
    url = make_url(args.storage)
    env = compose["services"]["postgres"]["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                         env["POSTGRES_DB"])
    dashboard = compose["services"]["dashboard"]["command"]
    assert dashboard[0] == "optuna-dashboard" and dashboard[1] == args.storage
    # Weights written by any worker are visible to the dashboard.
    assert args.artifact_dir == dashboard[dashboard.index("--artifact-dir") + 1]


def test_dockerfile_installs_the_package_with_postgres_support():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY nas ", text, re.M)
    assert re.search(r'pip install "?\.\[postgres\]"?', text)
