"""A CeleryExecutor Airflow deployment on this machine, without Docker.

The same topology as ``docker-compose.yaml``: PostgreSQL (metadata database and Celery result
backend) and Redis (Celery broker) from the Debian packages, each started in a private temporary
data directory on a free loopback port, then ``airflow scheduler``, ``dag-processor``,
``triggerer``, ``api-server`` and ``celery worker`` as separate processes sharing one config.
Everything is stopped and removed on exit, even when the body raised.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

PG_USER = "postgres"
DB_NAME = "airflow"
ADMIN_USER = "admin"
#: Airflow processes of the deployment, in start order (the api-server first: it serves the
#: execution API the worker's and triggerer's tasks talk to).
AIRFLOW_PROCESSES: dict[str, list[str]] = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--workers", "1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
    "worker": ["celery", "worker", "--concurrency", "4", "--without-mingle", "--without-gossip"],
}
TERMINAL_RUN_STATES = {"success", "failed"}


class DeploymentError(RuntimeError):
    """A service of the deployment did not start, or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary from the newest installed Debian ``postgresql-NN``."""
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[4]))
    if not candidates:
        raise DeploymentError(f"{name} not found: apt-get install postgresql")
    return str(candidates[-1])


def _wait_tcp(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float) -> None:
    """Wait until something accepts on 127.0.0.1:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"{name} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"{name} did not listen on port {port} within {timeout:.0f}s; see {log}")


def _tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Terminate a process and everything in its session (forked workers too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive a leader that already exited: sweep the whole group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class _Service:
    """One started process, its log file, and how to stop it."""

    name: str
    proc: subprocess.Popen
    log: Path
    grace: float = 30


@dataclass
class Services:
    """Processes started by the deployment, stopped in reverse order."""

    items: list[_Service] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None,
              user: str | None = None, cwd: Path | None = None, grace: float = 30) -> subprocess.Popen:
        """Start ``argv`` in its own session with stdout+stderr to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, start_new_session=True,
                user=user, group=user, extra_groups=[] if user else None, cwd=cwd,
            )
        self.items.append(_Service(name, proc, log, grace))
        return proc

    def check_alive(self) -> None:
        """Raise if any service has exited."""
        for svc in self.items:
            if svc.proc.poll() is not None:
                raise DeploymentError(
                    f"{svc.name} exited with {svc.proc.returncode}; see {svc.log}:\n{_tail(svc.log)}"
                )

    def stop_all(self) -> None:
        """Stop every service, newest first."""
        while self.items:
            svc = self.items.pop()
            _stop(svc.proc, svc.grace)


def start_postgres(services: Services, base: Path) -> str:
    """Start a private PostgreSQL on a free port; return its SQLAlchemy URL (psycopg2)."""
    # The server refuses to run as root: its directory belongs to the postgres user.
    as_root = os.geteuid() == 0
    pgdir = base / "postgres"
    pgdir.mkdir(mode=0o700)
    if as_root:
        shutil.chown(pgdir, PG_USER, PG_USER)
        base.chmod(0o711)  # let postgres reach its own directory below ours
    user = PG_USER if as_root else None
    data = pgdir / "data"
    log = base / "logs" / "postgres.log"
    subprocess.run(
        [_pg_bin("initdb"), "-D", str(data), "-U", DB_NAME, "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, user=user, group=user,
        extra_groups=[] if user else None, cwd=pgdir,
    )
    port = free_port()
    proc = services.start(
        "postgres",
        [_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
         "-c", f"unix_socket_directories={pgdir}", "-c", "max_connections=200",
         # A throwaway test database: durability buys nothing here.
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        log, user=user, cwd=pgdir,
    )
    _wait_tcp(port, proc, "postgres", log, 60)
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_NAME, DB_NAME],
            capture_output=True, text=True,
        )
        if done.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise DeploymentError(f"createdb failed: {done.stderr.strip()}")
        time.sleep(0.3)  # accepting TCP before it accepts logins ("starting up")
    return f"postgresql+psycopg2://{DB_NAME}@127.0.0.1:{port}/{DB_NAME}"


def start_redis(services: Services, base: Path) -> str:
    """Start a private, non-persistent Redis on a free port; return its URL."""
    port = free_port()
    rdir = base / "redis"
    rdir.mkdir()
    log = base / "logs" / "redis.log"
    proc = services.start(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(rdir),
         "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"],
        log, grace=10,
    )
    _wait_tcp(port, proc, "redis", log, 30)
    return f"redis://127.0.0.1:{port}/0"


def celery_settings(*, db_url: str, broker_url: str) -> dict[str, str]:
    """The settings that turn an Airflow config into the Celery topology (as in docker-compose.yaml)."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
    }


class Airflow:
    """A small client of the Airflow 3 public REST API (``/api/v2``), logged in as one user."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._username = username
        self._password = password
        self._token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise DeploymentError(f"{method} {path}: HTTP {err.code} {detail}") from err
        return json.loads(raw) if raw else None

    def token(self) -> str:
        """A JWT for the user (fetched once)."""
        if self._token is None:
            got = self._request("POST", "/auth/token",
                                {"username": self._username, "password": self._password}, auth=False)
            self._token = got["access_token"]
        return self._token

    def get(self, path: str) -> Any:
        """GET an ``/api/v2`` path."""
        return self._request("GET", "/api/v2" + path)

    def post(self, path: str, body: Any) -> Any:
        """POST to an ``/api/v2`` path."""
        return self._request("POST", "/api/v2" + path, body)

    def patch(self, path: str, body: Any) -> Any:
        """PATCH an ``/api/v2`` path."""
        return self._request("PATCH", "/api/v2" + path, body)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """Wait until the dag-processor has parsed ``dag_id`` into the database."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.get(f"/dags/{dag_id}")
            except DeploymentError as err:
                if time.monotonic() > deadline:
                    errors = self.get("/importErrors")
                    raise DeploymentError(f"DAG {dag_id} never appeared; import errors: {errors}") from err
                time.sleep(1)

    def trigger(self, dag_id: str, conf: dict | None = None, run_id: str | None = None) -> dict:
        """Start a manual run of ``dag_id`` with ``conf``."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post(f"/dags/{dag_id}/dagRuns", body)

    def run(self, dag_id: str, run_id: str) -> dict:
        """One DAG run as the API shows it."""
        return self.get(f"/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Task instances of one run."""
        got = self.get(f"/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id, safe='')}/taskInstances")
        return got["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float, check: Any = None) -> dict:
        """Poll a run until it succeeded or failed; ``check()`` is called each round (e.g. liveness)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(dag_id, run_id)
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} still {run['state']} after {timeout:.0f}s")
            time.sleep(2)


class CeleryDeployment:
    """PostgreSQL + Redis + the five Airflow processes, torn down on exit.

    ``env`` holds the Airflow settings and connections of the deployment (AIRFLOW__* and
    AIRFLOW_CONN_* variables, for example from the rehearsal's environment builder); this class adds
    only what makes it distributed: the database, the broker, ports, and the executor.
    """

    def __init__(self, env: Mapping[str, str], *, password: str | None = None) -> None:
        self._extra = dict(env)
        self.password = password or os.urandom(12).hex()
        self.base: Path | None = None
        self.env: dict[str, str] = {}
        self.api_url = ""
        self._services = Services()
        self._stack = ExitStack()

    def __enter__(self) -> CeleryDeployment:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="amibake-celery-"))
        self._stack.callback(shutil.rmtree, self.base, ignore_errors=True)
        self._stack.callback(self._services.stop_all)
        logs = self.base / "logs"
        logs.mkdir()
        home = self.base / "airflow"
        home.mkdir()
        db_url = start_postgres(self._services, self.base)
        broker_url = start_redis(self._services, self.base)
        api_port = free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        passwords = home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self.password}))
        passwords.chmod(0o600)
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
            "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(logs / "tasks"),
            "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(logs / "dag-processor"),
            **self._extra,
            **celery_settings(db_url=db_url, broker_url=broker_url),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        if "AIRFLOW__CORE__FERNET_KEY" not in self.env:
            from cryptography.fernet import Fernet

            self.env["AIRFLOW__CORE__FERNET_KEY"] = Fernet.generate_key().decode()
        migrate = subprocess.run(
            [self.airflow_bin, "db", "migrate"], env=self.env, capture_output=True, text=True
        )
        if migrate.returncode != 0:
            output = migrate.stdout[-3000:] + migrate.stderr[-3000:]
            raise DeploymentError(f"airflow db migrate failed:\n{output}")
        for name, args in AIRFLOW_PROCESSES.items():
            if name == "api-server":
                args = [*args, "--port", str(api_port)]
            proc = self._services.start(name, [self.airflow_bin, *args], logs / f"{name}.log", env=self.env,
                                        cwd=home)
            if name == "api-server":
                self._wait_healthy(proc)

    @property
    def airflow_bin(self) -> str:
        """The ``airflow`` command of the running interpreter's environment."""
        return str(Path(sys.executable).with_name("airflow"))

    def log(self, name: str) -> str:
        """The output so far of one service (``worker``, ``triggerer``, ...)."""
        assert self.base is not None
        return (self.base / "logs" / f"{name}.log").read_text(errors="replace")

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        """Wait for the api-server's health endpoint (metadatabase reachable)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._services.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as resp:
                    if json.load(resp)["metadatabase"]["status"] == "healthy":
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise DeploymentError(f"api-server not healthy at {self.api_url} within 120s")

    def check_alive(self) -> None:
        """Raise if any process of the deployment has died."""
        self._services.check_alive()

    def client(self) -> Airflow:
        """A REST client logged in as the admin user."""
        return Airflow(self.api_url, ADMIN_USER, self.password)

    def close(self) -> None:
        """Stop every process and remove the data directories."""
        self._stack.close()
