"""The OpenSSH parts of the offline build boxes (``rehearsal/boxes.py``): keys, sshd_config, readiness.

A box is a real ``/usr/sbin/sshd``; this module holds what does not depend on the box's isolation:
generating keys, writing a key-only ``sshd_config``, checking the variables sshd hands every session
(``SetEnv``), waiting for the SSH banner, and the offline package cache.

``session_env`` is given to every session (sshd's ``SetEnv``): the rehearsal and the tests pass
``AMIBAKE_PACKAGE_CACHE`` so ``build-image`` on a box keeps downloaded Debian packages between
builds. Offline only: a real box never has it, and the DAG never sets it.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
#: sshd refuses to start as root (and ``sshd -t`` to check a config) without its privilege-separation
#: directory, which only the distribution's service start makes: a fresh machine without init has none.
PRIVSEP_DIR = Path("/run/sshd")
#: Name prefix of each box's work dir (keys, config, identity files, home): a killed rehearsal's
#: next run finds and removes them by it.
WORK_DIR_PREFIX = "amibake-sshd-"
PR_SET_PDEATHSIG = 1
#: The variable build-image reads for its optional package cache (include/scripts/recipes/debian12.sh).
PACKAGE_CACHE_ENV = "AMIBAKE_PACKAGE_CACHE"

#: What sshd_config's SetEnv takes unquoted; anything else is refused rather than escaped.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_ENV_VALUE = re.compile(r"[A-Za-z0-9._/:-]+")


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


def checked_session_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` if sshd's ``SetEnv`` can carry it verbatim; ValueError naming the bad variable otherwise."""
    checked = dict(env or {})
    for name, value in checked.items():
        if not (_ENV_NAME.fullmatch(name) and _ENV_VALUE.fullmatch(value)):
            raise ValueError(f"session variable {name}={value!r}: use A-Z0-9_ names, ._/:- values")
    return checked


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child before exec: have the kernel send ``sig`` to it when the thread that forked it ends.

    So a test or rehearsal process killed without clean-up leaves no box behind. Linux only; the
    signal follows the forking THREAD, so start boxes from a long-lived thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at ``path`` / ``path.pub``; returns the public key as ``type base64``."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def sshd_config(
    *,
    address: str,
    port: int,
    host_key_file: Path,
    pid_file: Path,
    login: str,
    session_env: Mapping[str, str],
) -> str:
    """A key-only sshd_config for one login user: no root, no password, SFTP via ``internal-sftp``.

    The user's keys are where cloud-init puts them (``~/.ssh/authorized_keys``) and StrictModes is
    on, as on a real box. ``UsePAM no``: the box runs no PAM session stack; the account's shadow
    entry is therefore ``*`` (no password) rather than cloud-init's locked ``!``, which sshd without
    PAM would refuse.
    """
    setenv = " ".join(f"{name}={value}" for name, value in checked_session_env(session_env).items())
    return "\n".join(
        [
            f"ListenAddress {address}:{port}",
            f"HostKey {host_key_file}",
            f"PidFile {pid_file}",
            f"AllowUsers {login}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes yes",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            # one directive for all: sshd keeps only the first SetEnv line
            *([f"SetEnv {setenv}"] if setenv else []),
            "",
        ]
    )


def check_config(config_file: Path) -> None:
    """``sshd -t``: refuse a config sshd would not start with, with its message."""
    test = subprocess.run([SSHD, "-t", "-f", str(config_file)], capture_output=True, text=True)
    if test.returncode != 0:
        raise RuntimeError(f"sshd -t {config_file}: {test.stderr.strip()}")


def wait_for_banner(address: str, port: int, alive: Callable[[], bool], timeout: float) -> bool:
    """True once something at ``address:port`` answers with an SSH banner; False if ``alive()`` turns
    False or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((address, port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False
