"""The rehearsal's Airflow as a distributed CeleryExecutor deployment on this machine, without Docker.

The same topology as ``docker-compose.yaml``: PostgreSQL (metadata database and Celery result
backend) and Redis (Celery broker) from the Debian packages, each started in a private temporary
data directory on a free loopback port, then ``airflow api-server``, ``scheduler``,
``dag-processor``, ``triggerer`` and ``celery worker`` as separate processes sharing one config.
Everything else (connections, ``[amibake]`` settings, auth, secrets, process handling) is the
standalone rehearsal's ``LocalAirflow``: this module adds only what makes it distributed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rehearsal.airflow_env import AirflowError, LocalAirflow, airflow_cli, free_port

#: PostgreSQL refuses to run as root; as root we run it as Debian's ``postgres`` user.
PG_USER = "postgres"
#: Database name and (trusted, loopback-only) role of the metadata database.
DB_NAME = "airflow"
#: The worker: a few slots are plenty for one build, and keep memory low on 2 cores.
WORKER_ARGS = ["celery", "worker", "--concurrency", "4", "--without-mingle", "--without-gossip"]


def celery_settings(*, db_url: str, broker_url: str) -> dict[str, str]:
    """The settings that make an Airflow config the Celery topology (as in ``docker-compose.yaml``)."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db_url}",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
    }


def _pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program of the newest installed Debian ``postgresql-NN``."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[4]))
    if not found:
        raise AirflowError(f"{name} not found (Debian package postgresql)")
    return str(found[-1])


def _tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_port(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float = 60) -> None:
    """Wait until 127.0.0.1:port accepts connections; raise early (with the log) if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AirflowError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AirflowError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen, sig: signal.Signals, grace: float = 30) -> None:
    """Signal a service's process group, SIGKILL it after ``grace`` seconds, reap the leader."""
    for s, wait in ((sig, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


class CeleryAirflow(LocalAirflow):
    """``LocalAirflow`` on PostgreSQL + Redis with ``CeleryExecutor`` and a separate Celery worker.

    ``home`` holds Airflow's files and every process's log (``postgres.log``, ``redis.log``,
    ``worker.log`` beside the others); PostgreSQL's data lives in a temp dir of its own, which its
    user can reach. ``stop()`` stops the worker and the other Airflow processes first, then Redis
    and PostgreSQL, and removes their data.
    """

    def __init__(self, home: Path, extra_env: Mapping[str, str], **kwargs: Any) -> None:
        """As ``LocalAirflow`` (same keyword arguments), plus the Celery and database settings."""
        self.db_port = free_port()
        self.redis_port = free_port()
        db_url = f"postgresql+psycopg2://{DB_NAME}@127.0.0.1:{self.db_port}/{DB_NAME}"
        distributed = {
            **celery_settings(db_url=db_url, broker_url=f"redis://127.0.0.1:{self.redis_port}/0"),
            # the worker's and triggerer's log servers: free ports, not 8793/8794 (shared machine)
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        super().__init__(home, {**extra_env, **distributed}, **kwargs)
        self._backing: dict[str, subprocess.Popen] = {}
        self._pg_dir: Path | None = None

    def start(self, ready_timeout: float = 180.0) -> None:
        """Start PostgreSQL and Redis, then Airflow's processes, then the Celery worker."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_postgres()
        self._start_redis()
        super().start(ready_timeout)
        with open(self.log_dir / "worker.log", "ab") as log:
            self.procs["worker"] = self._spawned(
                subprocess.Popen(
                    airflow_cli(*WORKER_ARGS),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self._wait_worker(ready_timeout)

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> subprocess.Popen:
        """Start a backing service in its own session, its output in ``<log_dir>/<name>.log``."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = self._spawned(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=user,
                    group=user,
                    extra_groups=[] if user else None,
                    cwd=self._pg_dir if user else None,
                )
            )
        self._backing[name] = proc
        return proc

    def _start_postgres(self) -> None:
        """initdb + postgres on ``db_port`` (trust auth, loopback only), then create the database."""
        user = PG_USER if os.geteuid() == 0 else None
        self._pg_dir = Path(tempfile.mkdtemp(prefix="amibake-pg-"))
        if user:
            shutil.chown(self._pg_dir, user, user)
        data = self._pg_dir / "data"
        init = subprocess.run(
            [_pg_bin("initdb"), "-D", str(data), "-U", DB_NAME, "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            cwd=self._pg_dir,
        )
        if init.returncode != 0:
            raise AirflowError(f"initdb failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        proc = self._spawn(
            "postgres",
            [
                _pg_bin("postgres"),
                "-D",
                str(data),
                "-p",
                str(self.db_port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self._pg_dir}",
                "-c",
                "max_connections=200",
                # a throwaway test database: durability buys nothing here
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            user=user,
        )
        _wait_port(self.db_port, proc, "postgres", self.log_dir / "postgres.log")
        deadline = time.monotonic() + 30
        while True:  # it accepts TCP a moment before it accepts logins ("the database system is starting up")
            made = subprocess.run(
                [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.db_port), "-U", DB_NAME, DB_NAME],
                capture_output=True,
                text=True,
            )
            if made.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AirflowError(f"createdb failed: {made.stderr.strip()}")
            time.sleep(0.3)

    def _start_redis(self) -> None:
        """A non-persistent Redis on ``redis_port``, loopback only."""
        rdir = self.home / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(
            "redis",
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(rdir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
            ],
        )
        _wait_port(self.redis_port, proc, "redis", self.log_dir / "redis.log")

    def _wait_worker(self, timeout: float) -> None:
        """Wait until the Celery worker is connected to the broker and ready for tasks."""
        log = self.log_dir / "worker.log"
        deadline = time.monotonic() + timeout
        while " ready." not in log.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise AirflowError(f"Celery worker not ready within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.5)

    def check_alive(self) -> None:
        """Raise if any Airflow process, PostgreSQL or Redis has exited."""
        super().check_alive()
        for name, proc in self._backing.items():
            if proc.poll() is not None:
                log = self.log_dir / f"{name}.log"
                raise AirflowError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")

    def stop(self, grace: float = 30.0) -> None:
        """Stop the Airflow processes (worker included), then Redis and PostgreSQL; remove their data."""
        super().stop(grace)
        # SIGINT is PostgreSQL's "fast shutdown"; Redis exits cleanly on SIGTERM.
        for name in reversed(list(self._backing)):
            _stop(self._backing.pop(name), signal.SIGINT if name == "postgres" else signal.SIGTERM)
        if self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None
