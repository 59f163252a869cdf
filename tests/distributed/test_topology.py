"""The Celery deployment the tests start (``rehearsal.distributed``) has the shape of
``docker-compose.yaml``: the same Airflow processes and the same distributed settings. Fast: reads
files and builds objects only; nothing is started.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from rehearsal.airflow_env import PROCESSES
from rehearsal.distributed import WORKER_ARGS, CeleryAirflow, celery_settings

REPO = Path(__file__).resolve().parents[2]


def _compose_airflow() -> tuple[dict[str, str], set[str]]:
    """docker-compose.yaml's common Airflow environment and the commands of its long-running services."""
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    env = compose["x-airflow-common"]["environment"]
    commands = {
        svc["command"]
        for name, svc in compose["services"].items()
        if name.startswith("airflow-") and name != "airflow-init" and "command" in svc
    }
    return env, commands


def test_the_same_airflow_processes_as_compose() -> None:
    _, commands = _compose_airflow()
    ours = {args[0] for args in PROCESSES.values()} | {" ".join(WORKER_ARGS[:2])}
    assert ours == commands


def test_the_same_distributed_settings_as_compose(tmp_path: Path) -> None:
    compose_env, _ = _compose_airflow()
    deployment = CeleryAirflow(tmp_path / "airflow", {})
    ours = celery_settings(db_url="postgresql+psycopg2://a@h:1/d", broker_url="redis://h:2/0")
    assert set(ours) <= set(compose_env)
    for key in ours:
        assert deployment.env[key] != "", key
    assert deployment.env["AIRFLOW__CORE__EXECUTOR"] == compose_env["AIRFLOW__CORE__EXECUTOR"]

    def scheme(key: str, env: dict[str, str]) -> str:
        return urlsplit(env[key]).scheme

    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL"):
        assert scheme(key, deployment.env) == scheme(key, compose_env), key
    # compose lets SQLAlchemy pick the PostgreSQL driver; we name psycopg2 (the one installed here)
    assert scheme("AIRFLOW__CELERY__RESULT_BACKEND", deployment.env).startswith("db+postgresql")
    assert scheme("AIRFLOW__CELERY__RESULT_BACKEND", compose_env).startswith("db+postgresql")


def test_backing_services_listen_on_loopback_only(tmp_path: Path) -> None:
    deployment = CeleryAirflow(tmp_path / "airflow", {})
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL"):
        assert urlsplit(deployment.env[key].removeprefix("db+")).hostname == "127.0.0.1", key
    # not Airflow's fixed 8793/8794: other deployments on this machine may hold them
    for key in ("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"):
        assert deployment.env[key] not in ("8793", "8794"), key
