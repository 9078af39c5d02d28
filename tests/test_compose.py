"""docker-compose.yml and the Dockerfile agree with the CLI. Docker can't run here; the topology
itself (workers sharing a PostgreSQL study) is exercised for real in test_workers.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from nas.cli.search import build_parser

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
    services = compose["services"]
    assert set(services) == {"postgres", "dashboard", "mnist", "worker"}
    postgres = services["postgres"]
    assert "healthcheck" in postgres and "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mnist_is_fetched_once_before_the_workers_start(compose):
    mnist, worker = compose["services"]["mnist"], compose["services"]["worker"]
    assert mnist["command"] == ["python", "-m", "nas.data"]
    assert worker["depends_on"]["mnist"]["condition"] == "service_completed_successfully"
    # Both see the same data directory, where nas.data looks for it.
    data_volume = {v.split(":")[0] for v in mnist["volumes"] if v.endswith(":/data")}
    assert data_volume and data_volume == {v.split(":")[0] for v in worker["volumes"] if v.endswith(":/data")}
    assert mnist["environment"]["NAS_DATA_DIR"] == worker["environment"]["NAS_DATA_DIR"] == "/data"
    assert int(worker["environment"]["OMP_NUM_THREADS"]) >= 1


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


def test_each_worker_container_is_one_process_of_worker_threads_threads(compose, monkeypatch):
    """`--scale worker=N` means N training processes, and WORKER_THREADS the threads of each: the
    search's own default (auto) would start a process per CPU in every container."""
    worker = compose["services"]["worker"]
    command = worker["command"]
    assert command[command.index("--workers") + 1] == "1"
    monkeypatch.delenv("NAS_WORKERS", raising=False)  # the tests' own default must not stand in for the file's
    args = build_parser().parse_args(command[3:])
    assert args.workers == 1
    assert args.threads == int(worker["environment"]["OMP_NUM_THREADS"]) == 1
    raw = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    assert raw["command"][raw["command"].index("--threads") + 1] == raw["environment"]["OMP_NUM_THREADS"] \
        == "${WORKER_THREADS:-1}"


def test_the_dockerfile_names_files_that_exist():
    text = (REPO_ROOT / "Dockerfile").read_text()
    named = set(re.findall(r"\bnas/[\w/]+\.\w+", text))
    assert named and all((REPO_ROOT / path).is_file() for path in named), named


def test_dockerfile_installs_the_package_with_postgres_support():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY nas ", text, re.M)
    assert re.search(r'pip install "?\.\[postgres\]"?', text)
    # The default study file the workers read is in the image.
    assert re.search(r"^COPY studies/\*\.toml ", text, re.M) and (REPO_ROOT / "studies" / "mnist-8k.toml").is_file()


def test_the_build_context_leaves_out_data_environments_and_studies():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "studies/*.db", "studies/artifacts"} <= ignored


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_compose_itself_accepts_the_file():
    """Compose's own parser, where it is installed (it needs no Docker engine for this)."""
    result = subprocess.run([*compose_command(), "config", "-q"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
