"""A real Airflow for the offline rehearsal: its settings, its processes and a REST client.

The settings (connections, ``[amibake]`` section) live here once; the rehearsal, the benchmarks and
the deployment tests (which compare ``docker-compose.yaml`` with them) all read them from here.
``LocalAirflow`` migrates its database (``migrate_db``), then starts api-server, scheduler,
dag-processor and triggerer as separate processes (what ``airflow standalone`` runs) on SQLite with
LocalExecutor, each in its own session with its log in ``<home>/logs/<name>.log``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import closing
from datetime import date, timedelta
from importlib.metadata import distributions, version
from pathlib import Path
from typing import Any

from operators import defaults
from rehearsal import processes

REPO = Path(__file__).resolve().parent.parent
#: Everything a rehearsal writes (gitignored).
REHEARSAL_DIR = REPO / ".rehearsal"
DAGS_FOLDER = REPO / "dags"
ADMIN_USER = "admin"
#: Set in the environment of every process a rehearsal starts, so a later run finds strays.
MARKER_ENV = "AMIBAKE_REHEARSAL"
#: Empty metadata databases as ``airflow db migrate`` leaves them, one per Airflow version (gitignored).
DB_TEMPLATES = REPO / ".cache" / "airflow-db"
_SQLITE = "sqlite:///"
#: Airflow processes in start order; the api-server serves the execution API the tasks talk to.
PROCESSES: dict[str, list[str]] = {
    "api-server": ["api-server", "--host", "127.0.0.1", "--workers", "1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}
#: ``[amibake]`` settings of the offline rehearsal: as on AWS, each build box is reached on its
#: instance's public IP (``rehearsal.boxes`` gives every instance its own loopback address), and
#: tcp/22 is admitted from where the workers are (``rehearsal.boxes.BOX_NETWORK``).
REHEARSAL_SETTINGS: dict[str, str] = {
    "ssh_address": "public_ip",
    "ssh_cidr": "127.0.0.0/8",
}


def dormant_schedule(today: date) -> str:
    """A yearly cron whose last and next firing are both about half a year from ``today``.

    Unpausing a DAG whose previous cron point lies within a tenth of its period makes the scheduler
    start a run at once (CronTriggerTimetable without catchup); with this schedule the rehearsal's
    triggered run is the only one, whatever the date.
    """
    fire = today + timedelta(days=182)
    return f"0 0 {min(fire.day, 28)} {fire.month} *"


def rehearsal_settings(today: date) -> dict[str, str]:
    """Every ``[amibake]`` setting the rehearsal gives its Airflow."""
    return {**REHEARSAL_SETTINGS, "schedule": dormant_schedule(today)}


#: Dummy credentials for the local EC2 API (moto accepts any).
FAKE_AWS_LOGIN = ("testing", "testing")


class AirflowError(RuntimeError):
    """An Airflow process did not start, died, or its API answered with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conn_env_var(conn_id: str) -> str:
    """Environment variable that defines an Airflow connection."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def setting_env_var(key: str) -> str:
    """Environment variable of one ``[amibake]`` setting; refuses a setting the DAG does not know."""
    if key not in defaults.SETTINGS:
        raise KeyError(f"unknown [amibake] setting {key!r} (known: {', '.join(defaults.SETTINGS)})")
    return f"AIRFLOW__{defaults.CONFIG_SECTION.upper()}__{key.upper()}"


def amibake_env(
    *, aws_extra: Mapping[str, str], ssh_connection: Mapping[str, Any], settings: Mapping[str, str]
) -> dict[str, str]:
    """Environment that gives every Airflow process the two connections and the ``[amibake]`` settings."""
    login, password = FAKE_AWS_LOGIN
    aws = {"conn_type": "aws", "login": login, "password": password, "extra": dict(aws_extra)}
    env = {
        conn_env_var(defaults.AWS_CONN_ID): json.dumps(aws),
        conn_env_var(defaults.SSH_CONN_ID): json.dumps(dict(ssh_connection)),
    }
    env.update({setting_env_var(key): value for key, value in settings.items()})
    return env


def airflow_env(home: Path, api_port: int, password_file: Path, dags_folder: Path) -> dict[str, str]:
    """Core settings of the local Airflow: SQLite, LocalExecutor, our dags, simple auth, shared secrets."""
    from cryptography.fernet import Fernet

    api_url = f"http://127.0.0.1:{api_port}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api_url,
        # every process must sign and check the same JWTs (tasks ↔ execution API, UI ↔ REST API)
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # Parse the DAG file every 2 min, not every 30 s: each parse forks and imports the operators
        # (about 1.5 CPU-s), which made the dag-processor the idle rehearsal's busiest process. An
        # edited definition shows up within 2 min; a changed DAG file at once (its mtime is read).
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
        # no EC2 instance metadata lookups for credentials on this machine
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def airflow_cli(*args: str) -> list[str]:
    """Command line of the venv's ``airflow`` CLI."""
    return [str(Path(sys.executable).with_name("airflow")), *args]


def migrate_db(env: Mapping[str, str]) -> None:
    """Bring the metadata database that ``env`` names to Airflow's schema; raises ``AirflowError``.

    A new SQLite database starts as a copy of the one ``airflow db migrate`` made the first time for
    these Airflow and provider versions: the same tables and rows, without the 6 CPU-s each migration
    costs (the test suite starts about fifteen Airflows). Any other database, one that exists, or one
    Airflow finds by its own default, is migrated.
    """
    url = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    db = Path(url.removeprefix(_SQLITE)) if url.startswith(_SQLITE) else None
    new = db if db is not None and not db.exists() else None
    template = DB_TEMPLATES / f"airflow-{version('apache-airflow-core')}-{_airflow_dists_digest()}.db"
    if new and template.exists():
        _copy_db(template, new)
        return
    cmd = airflow_cli("db", "migrate")
    migrate = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if migrate.returncode != 0:
        raise AirflowError(f"airflow db migrate failed:\n{(migrate.stdout + migrate.stderr)[-3000:]}")
    if new:  # another process may be writing the template too: each renames a whole copy into place
        DB_TEMPLATES.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f".{template.name}.{os.getpid()}")
        _copy_db(new, partial)
        partial.replace(template)


def _airflow_dists_digest() -> str:
    """A short digest of the installed Airflow distributions and versions (core and providers: a
    provider may bring tables of its own)."""
    names = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in distributions()
        if (d.metadata["Name"] or "").lower().startswith("apache-airflow")
    )
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def _copy_db(source: Path, target: Path) -> None:
    """A consistent copy of SQLite database ``source`` as ``target``, through SQLite's backup API (so
    a write-ahead log not yet folded into the file is copied too)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalAirflow:
    """Airflow's processes on SQLite + LocalExecutor in ``home``, with a logged-in REST client."""

    def __init__(
        self,
        home: Path,
        extra_env: Mapping[str, str],
        api_port: int = 0,
        dags_folder: Path = DAGS_FOLDER,
        on_spawn: Callable[[int], object] | None = None,
    ) -> None:
        """``on_spawn`` is called with each process's pid as soon as it exists (each leads its own
        session), so a harness can record it before anything else can go wrong."""
        if not 0 <= api_port <= 65535:
            raise ValueError(f"api_port {api_port} must be between 0 and 65535")
        self.home = Path(home)
        self.api_port = api_port or free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.password = secrets.token_urlsafe(12)
        self.password_file = self.home / "passwords.json"
        self.env = {
            **os.environ,
            **airflow_env(self.home, self.api_port, self.password_file, dags_folder),
            **extra_env,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self._sessions: dict[int, processes.Session] = {}  # by leader pid, for stop()
        self._on_spawn = on_spawn
        self._token = ""

    @property
    def log_dir(self) -> Path:
        """Where each process's own log goes."""
        return self.home / "logs"

    def start(self, ready_timeout: float = 180.0) -> None:
        """Migrate the database, start the processes and log in; raises with a log tail on failure."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(json.dumps({ADMIN_USER: self.password}) + "\n")
        self.password_file.chmod(0o600)
        migrate_db(self.env)
        for name, args in PROCESSES.items():
            extra = ["--port", str(self.api_port)] if name == "api-server" else []
            with open(self.log_dir / f"{name}.log", "ab") as log:
                self.procs[name] = self._spawned(
                    subprocess.Popen(
                        airflow_cli(*args, *extra),
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # Ctrl-C reaches only the harness, which stops us in order
                    )
                )
        self._wait_healthy(ready_timeout)
        self._token = self._login()

    def _spawned(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Record a process just started in its own session, and report it to ``on_spawn``."""
        self._sessions[proc.pid] = processes.record(proc.pid)
        if self._on_spawn:
            self._on_spawn(proc.pid)
        return proc

    def check_alive(self) -> None:
        """Raise if any Airflow process has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AirflowError(
                    f"airflow {name} exited with {proc.returncode}:\n{_tail(self.log_dir / f'{name}.log')}"
                )

    def _wait_healthy(self, timeout: float) -> None:
        """Wait until the api-server answers and reports its scheduler, dag-processor, triggerer healthy."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                    health = json.loads(resp.read())
                parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
                states = {p: (health.get(p) or {}).get("status") for p in parts}
                if all(s == "healthy" for s in states.values()):
                    return
                last = json.dumps(states)
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(1)
        raise AirflowError(f"Airflow not healthy within {timeout:.0f} s ({last})")

    def _login(self) -> str:
        """A JWT for the REST API, as the UI's login does (``POST /auth/token``)."""
        body = {"username": ADMIN_USER, "password": self.password}
        return self.request("POST", "/auth/token", body, auth=False)["access_token"]

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        """One REST call; returns the decoded JSON answer, raises ``AirflowError`` on an HTTP error."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise AirflowError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        return json.loads(payload) if payload else None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM each process's group, wait up to ``grace`` s for them, then end whatever is left in
        their sessions (executor workers, task runners) and return only once it is gone."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        processes.end(processes.still_ours(self._sessions[proc.pid] for proc in self.procs.values()), grace=5)
        self.procs.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
