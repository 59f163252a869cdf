"""The one door to the build box: the SSH provider's hook for it, shipping files, streaming commands.

Imported by tasks at run time only (it imports paramiko).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import posixpath
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from operators import defaults
from operators.rules.remote import (
    BOOT_STAGE,
    CHECK,
    CHECK_FAIL,
    EXPECTATIONS,
    PACKAGES,
    BuildProgress,
    parse_check_lines,
    read_file_argv,
)

if TYPE_CHECKING:
    from airflow.providers.ssh.hooks.ssh import SSHHook

#: How long one read may block before the loop checks the deadline again (not a silence timeout).
READ_SLICE_S = 1.0


@dataclass
class CommandResult:
    """Outcome of one remote command."""

    exit_code: int | None
    progress: BuildProgress = field(default_factory=BuildProgress)
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)


def ship_directory(client: paramiko.SSHClient, local_dir: Path, remote_dir: str) -> int:
    """Copy a local directory tree to the box over SFTP, keeping file modes; returns the file count."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"scripts directory {local_dir} does not exist")
    count = 0
    with client.open_sftp() as sftp:
        _sftp_makedirs(sftp, remote_dir)
        for root, dirs, files in os.walk(local_dir):
            dirs.sort()
            rel = Path(root).relative_to(local_dir)
            target_dir = posixpath.join(remote_dir, *rel.parts)
            _sftp_makedirs(sftp, target_dir)
            for name in sorted(files):
                local = Path(root) / name
                target = posixpath.join(target_dir, name)
                sftp.put(str(local), target)
                sftp.chmod(target, stat.S_IMODE(local.stat().st_mode))
                count += 1
    return count


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """``mkdir -p`` over SFTP (mode 0700: only the login user may change what root will run)."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = posixpath.join(current, part)
        try:
            sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current, mode=0o700)


def run_streaming(
    client: paramiko.SSHClient,
    command: str,
    *,
    timeout_s: float,
    log: logging.Logger,
    on_channel: Callable[[paramiko.Channel | None], None] | None = None,
    stdin: bytes | None = None,
) -> CommandResult:
    """Run one command with a pty, logging each output line as it arrives.

    There is no silence timeout: a quiet phase may run as long as it needs. ``timeout_s`` is a hard
    limit on the whole command; when it passes the channel is closed (the pty hangs up the remote
    process group) and ``timed_out`` is set. Progress lines are parsed into ``progress`` and logged
    as phase start / end lines instead of raw JSON. ``on_channel`` is told the open channel (and
    None at the end) so ``on_kill`` can close it. With ``stdin`` the command gets those bytes and
    then end-of-file (a script for ``bash -s``), so it runs without a pty, stderr merged into stdout.
    """
    result = CommandResult(exit_code=None)
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError("SSH transport to the build box is not active")
    channel = transport.open_session()
    if on_channel:
        on_channel(channel)
    try:
        if stdin is None:
            channel.get_pty(term="dumb", width=200, height=50)
        else:
            channel.set_combine_stderr(True)
        channel.settimeout(READ_SLICE_S)
        channel.exec_command(command)
        if stdin is not None:
            channel.sendall(stdin)
            channel.shutdown_write()
        deadline = time.monotonic() + timeout_s
        pending = b""
        while True:
            if time.monotonic() > deadline:
                result.timed_out = True
                break
            try:
                data = channel.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            pending += data
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                _emit(raw.decode(errors="replace").rstrip("\r"), result, log)
        if pending:
            _emit(pending.decode(errors="replace").rstrip("\r"), result, log)
        if not result.timed_out:
            result.exit_code = channel.recv_exit_status()
    finally:
        channel.close()
        if on_channel:
            on_channel(None)
    return result


def _emit(line: str, result: CommandResult, log: logging.Logger) -> None:
    """Log one output line; progress lines become readable phase messages."""
    result.lines.append(line)
    event = result.progress.feed(line)
    if event is None:
        item = parse_check_lines([line])[0]
        if item:  # an instance-check line, run over SSH on an instance (the smoke check)
            ((name, (status, detail)),) = item.items()
            level = logging.ERROR if status == CHECK_FAIL else logging.INFO
            log.log(level, "instance check: %s: %s: %s", name, status, detail)
        else:
            log.info("box | %s", line)
        return
    kind, phase = event.get("event"), event.get("phase")
    if kind == "phase-start":
        log.info("phase %s started", phase)
    elif kind == "phase-end":
        log.info("phase %s finished in %.1f s", phase, float(event.get("seconds", 0.0)))
    elif kind == "phase-fail":
        log.error(
            "phase %s FAILED with exit code %s after %s s (log: %s)",
            phase,
            event.get("rc"),
            event.get("seconds"),
            event.get("log"),
        )
    elif kind == BOOT_STAGE:
        stage, seconds = event.get("stage"), float(event.get("seconds", 0.0))
        log.info("boot check: stage %s took %.1f s (at %s s)", stage, seconds, event.get("at"))
    elif kind == CHECK:
        level = logging.ERROR if event.get("status") == CHECK_FAIL else logging.INFO
        log.log(level, "boot check: %s: %s: %s", event.get("item"), event.get("status"), event.get("detail"))
    elif kind == EXPECTATIONS:
        log.info(
            "first boot must show: login user %s, kernel arguments %r, baked host keys %s, SELinux %s",
            event.get("login_user"),
            event.get("cmdline"),
            event.get("baked_host_keys") or "none",
            "required" if event.get("require_selinux") else "not required",
        )
    elif kind == PACKAGES:
        log.info(
            "package list: %s packages in %s on the box, sha256 %s",
            event.get("count"),
            event.get("path"),
            event.get("sha256"),
        )
    else:
        log.info("build-image: %s", {k: v for k, v in event.items() if k != "event"} | {"event": kind})


def fetch_file(
    client: paramiko.SSHClient, path: str, *, sudo: bool, max_bytes: int, timeout_s: float = 60.0
) -> bytes:
    """The bytes of one file of the box, read with ``cat`` over an exec channel of ``client`` (as root
    through ``sudo -n`` when ``sudo``: what the build writes is root's). Refuses a file larger than
    ``max_bytes`` and a failed read (with the box's message)."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError("SSH transport to the build box is not active")
    channel = transport.open_session()
    try:
        channel.settimeout(READ_SLICE_S)
        channel.exec_command(shlex.join(read_file_argv(path, sudo=sudo)))
        deadline = time.monotonic() + timeout_s
        data = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {path} from the box took longer than {timeout_s} s")
            try:
                chunk = channel.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
            if len(data) > max_bytes:
                raise ValueError(f"{path} on the box is larger than {max_bytes} bytes")
        status = channel.recv_exit_status()
        errors = bytearray()
        while channel.recv_stderr_ready() and len(errors) < 4096:
            errors += channel.recv_stderr(4096)
    finally:
        channel.close()
    if status != 0:
        message = errors.decode(errors="replace").strip()[-500:]
        raise FileNotFoundError(f"could not read {path} on the box (exit code {status}): {message}")
    return bytes(data)


def public_key_of_connection(ssh_conn_id: str) -> str:
    """``type base64`` public key derived from the SSH connection's private key (for the user data)."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    # the connection holds login + key only (the box's address comes from EC2), and SSHHook insists
    # on a host: give it a placeholder, nothing connects through this hook
    hook = SSHHook(ssh_conn_id=ssh_conn_id, remote_host="build-box-not-launched-yet")
    pkey = hook.pkey
    if pkey is None and hook.key_file:
        pkey = paramiko.PKey.from_path(hook.key_file)
    if pkey is None:
        raise ValueError(f"SSH connection {ssh_conn_id!r} has no private_key (or key_file) to log in with")
    return f"{pkey.get_name()} {pkey.get_base64()} amibake"


def box_ssh_hook(box: dict[str, Any], *, ssh_conn_id: str) -> SSHHook:
    """The SSH provider's hook for the build box described by ``LaunchBuildBox``'s XCom.

    Login and key come from the SSH connection; the address from the XCom (the box's IP on port 22,
    or with ``ssh_address=connection`` the connection's own host and port: a tunnel's local end);
    the host key is always the per-build one the box got through cloud-init, so the hook follows a
    new box every night and refuses any other.
    """
    from airflow.providers.ssh.hooks.ssh import SSHHook

    hook = SSHHook(
        ssh_conn_id=ssh_conn_id,
        remote_host=box["address"],
        port=int(box["port"]),
        conn_timeout=defaults.SSH_CONNECT_TIMEOUT_S,
    )
    _pin_host_key(hook, box["host_key"])
    return hook


def instance_ssh_hook(*, address: str, username: str, private_key: str, host_key: str) -> SSHHook:
    """The SSH provider's hook for an instance amibake launched with its own login key (the smoke
    instance): no connection, the key given in memory (never a file), only ``host_key`` accepted."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    hook = SSHHook(
        remote_host=address,
        username=username,
        port=22,
        conn_timeout=defaults.SSH_CONNECT_TIMEOUT_S,
        conn_retry_attempts=1,
    )
    hook.pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(private_key))
    hook.look_for_keys = False  # this key only, not the worker's ~/.ssh keys or agent
    _pin_host_key(hook, host_key)
    return hook


def _pin_host_key(hook: SSHHook, host_key: str) -> None:
    """Accept only ``host_key`` (``type base64``) from the hook's host."""
    key_type, key_b64 = host_key.split()[:2]
    hook.host_key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    hook.no_host_key_check = False


def box_session(
    box: dict, ssh_conn_id: str, *, build: str, volume_id: str, recipe: str, device: str, size: int
) -> tuple[Any, dict[str, Any]]:
    """The box's SSH hook, and the ``build-image`` arguments every call on this canvas shares."""
    ssh = box_ssh_hook(box, ssh_conn_id=ssh_conn_id)
    common = {
        "build": build,
        "volume_id": volume_id,
        "recipe": recipe,
        "device_name": device,
        "size_gib": size,
        "sudo": ssh.username != "root",
    }
    return ssh, common
