"""A real OpenSSH server on 127.0.0.1 with throwaway keys: the offline "build box".

``LocalSshd`` makes a private temp dir, generates an ed25519 user key and host key there with
``ssh-keygen``, and runs ``/usr/sbin/sshd -D -f <cfg>`` bound to 127.0.0.1 on a free port:
key login only (root allowed by key, no password, no keyboard-interactive), the temp
``authorized_keys``, SFTP through ``internal-sftp``. The host key is pinned in the Airflow
connection it describes, so the SSH provider verifies it. On exit sshd is killed and the dir removed.

``session_env`` is given to every session (sshd's ``SetEnv``): the rehearsal and the tests pass
``AMIBAKE_PACKAGE_CACHE`` so ``build-image`` on this "box" keeps downloaded Debian packages between
builds. Offline only: a real box never has it, and the DAG never sets it.

Standalone: ``python -m rehearsal.sshd`` prints the connection JSON and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import ctypes
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
#: sshd refuses to start as root without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
START_ATTEMPTS = 5
#: Name prefix of each instance's work dir (keys, config, log).
WORK_DIR_PREFIX = "amibake-sshd-"
PR_SET_PDEATHSIG = 1
#: The variable build-image reads for its optional package cache (include/scripts/recipes/debian12.sh).
PACKAGE_CACHE_ENV = "AMIBAKE_PACKAGE_CACHE"


def package_cache() -> Path:
    """Where offline builds keep downloaded packages: ``$AMIBAKE_PACKAGE_CACHE``, else ``.cache/packages``.

    Shared by the rehearsal, the tests and the benchmarks, so only the first build on a machine
    downloads everything.
    """
    default = Path(__file__).resolve().parents[1] / ".cache" / "packages"
    return Path(os.environ.get(PACKAGE_CACHE_ENV) or default).resolve()


def package_cache_env(cache: Path | None) -> dict[str, str]:
    """The environment that makes build-image use ``cache`` (none when ``cache`` is None)."""
    return {PACKAGE_CACHE_ENV: str(cache)} if cache else {}


def _die_with_parent() -> None:
    """In the child before exec: have the kernel SIGTERM sshd when its parent dies.

    So a test process killed by a timeout (no fixture teardown) leaves no sshd behind. Linux only;
    the signal follows the thread that started sshd, so start LocalSshd from a long-lived thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


#: What sshd_config's SetEnv takes unquoted; anything else is refused rather than escaped.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_ENV_VALUE = re.compile(r"[A-Za-z0-9._/:-]+")


def _free_port() -> int:
    """A port nobody listens on right now (sshd may still lose a race: start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSshd:
    """An sshd on 127.0.0.1:<free port> that admits one throwaway key."""

    def __init__(
        self,
        *,
        login: str | None = None,
        ready_timeout: float = 20.0,
        session_env: Mapping[str, str] | None = None,
        parent_dir: Path | None = None,
    ) -> None:
        """``parent_dir`` holds the work dir with the keys (default: the system temp dir); a
        harness that can be killed puts it in its state dir, where its next run removes it."""
        self.session_env = dict(session_env or {})
        for name, value in self.session_env.items():
            if not (_ENV_NAME.fullmatch(name) and _ENV_VALUE.fullmatch(value)):
                raise ValueError(f"session variable {name}={value!r}: use A-Z0-9_ names, ._/:- values")
        self.login = login or getpass.getuser()
        self.ready_timeout = ready_timeout
        self.parent_dir = parent_dir
        self.port = 0
        self.host = "127.0.0.1"
        self.host_key_b64 = ""
        self.host_key_type = ""
        self.private_key_pem = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LocalSshd:
        """Generate keys, write the config and start sshd; undo everything on failure."""
        try:
            self._dir = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX, dir=self.parent_dir))
            os.chmod(self._dir, 0o700)
            self._keygen("host_ed25519")
            self._keygen("user_ed25519")
            shutil.copyfile(self._dir / "user_ed25519.pub", self._dir / "authorized_keys")
            os.chmod(self._dir / "authorized_keys", 0o600)
            self.private_key_pem = (self._dir / "user_ed25519").read_text()
            self.host_key_type, self.host_key_b64 = (self._dir / "host_ed25519.pub").read_text().split()[:2]
            if os.geteuid() == 0:
                PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            self._run_sshd()
        except BaseException:
            self.stop()
            raise
        return self

    def _keygen(self, name: str) -> None:
        assert self._dir is not None
        subprocess.run(
            [
                SSH_KEYGEN,
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"amibake-{name}",
                "-f",
                str(self._dir / name),
            ],
            check=True,
            capture_output=True,
        )

    def _config(self) -> str:
        assert self._dir is not None
        d = self._dir
        setenv = " ".join(f"{name}={value}" for name, value in self.session_env.items())
        return "\n".join(
            [
                f"Port {self.port}",
                f"ListenAddress {self.host}",
                f"HostKey {d / 'host_ed25519'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                f"AllowUsers {self.login}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # the key files live in a 0700 temp dir, whose parents StrictModes may reject
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                # one directive for all: sshd keeps only the first SetEnv line
                *([f"SetEnv {setenv}"] if setenv else []),
                "",
            ]
        )

    def _run_sshd(self) -> None:
        """Start sshd on a free port, retrying if another process grabbed the port first."""
        assert self._dir is not None
        cfg = self._dir / "sshd_config"
        last_error = ""
        for _ in range(START_ATTEMPTS):
            self.port = _free_port()
            cfg.write_text(self._config())
            subprocess.run([SSHD, "-t", "-f", str(cfg)], check=True, capture_output=True)
            log = self._dir / "sshd.log"
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log.open("wb"),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only async-signal-safe work (one prctl)
            )
            if self._wait_ready():
                return
            last_error = log.read_text(errors="replace")
            self._kill()
        raise RuntimeError(f"sshd did not start after {START_ATTEMPTS} attempts: {last_error.strip()}")

    def _wait_ready(self) -> bool:
        """True once sshd answers with its banner; False if it exited or never answered."""
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Kill sshd (and the sessions it forked) and remove the keys; safe to call twice."""
        if self._proc is not None:
            pgid = self._proc.pid
            self._kill()
            # sessions forked by sshd share its process group (start_new_session above)
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def pid(self) -> int:
        """sshd's pid (it leads its own session)."""
        if self._proc is None:
            raise RuntimeError("sshd is not running")
        return self._proc.pid

    def __enter__(self) -> LocalSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Airflow connection ---------------------------------------------------------------
    @property
    def host_key(self) -> str:
        """The public host key as ``type base64``, the form of the connection's ``host_key`` extra."""
        return f"{self.host_key_type} {self.host_key_b64}"

    def connection_dict(self) -> dict[str, Any]:
        """The ``amibake_ssh`` connection as Airflow's JSON connection form."""
        return {
            "conn_type": "ssh",
            "host": self.host,
            "port": self.port,
            "login": self.login,
            "extra": {"private_key": self.private_key_pem, "host_key": self.host_key},
        }

    def connection_json(self) -> str:
        """JSON for ``AIRFLOW_CONN_AMIBAKE_SSH``."""
        return json.dumps(self.connection_dict())

    def connection_uri(self) -> str:
        """URI form of the same connection (extras URL-encoded)."""
        return (
            f"ssh://{quote(self.login, safe='')}@{self.host}:{self.port}/"
            f"?private_key={quote(self.private_key_pem, safe='')}&host_key={quote(self.host_key, safe='')}"
        )


def main() -> int:
    """Run a :class:`LocalSshd` in the foreground, print its connection JSON, stop on a signal."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with LocalSshd() as sshd:
        print(sshd.connection_json(), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
