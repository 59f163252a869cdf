"""The box's SSH host key is verified: a wrong or unknown key is refused, unless the connection opts out.

Real sshd on 127.0.0.1, reached through ``operators.hooks.ec2.box_ssh_hook`` exactly as every task does.
"""

from __future__ import annotations

import json
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from operators.hooks.box import box_ssh_hook


def _connect_with(monkeypatch: pytest.MonkeyPatch, sshd: Any, **extra: Any) -> None:
    """Open and close one SSH session with the ``amibake_ssh`` connection's extra replaced."""
    conn = sshd.connection_dict()
    conn["extra"] = {"private_key": sshd.private_key_pem, **extra}
    monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_SSH", json.dumps(conn))
    hook = box_ssh_hook({}, ssh_conn_id="amibake_ssh", ssh_address="connection")
    client = hook.get_conn()
    try:
        _, stdout, _ = client.exec_command("true")
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


def test_the_pinned_host_key_is_accepted(sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _connect_with(monkeypatch, sshd, host_key=sshd.host_key)


def test_a_different_host_key_is_refused(sshd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # another ed25519 key: same type as the box's, so only the key itself differs
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    assert other.decode() != sshd.host_key
    with pytest.raises(paramiko.SSHException, match="(?i)host key"):
        _connect_with(monkeypatch, sshd, host_key=other.decode())


def test_an_unknown_host_is_refused_without_an_explicit_opt_out(
    sshd: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no known_hosts of this user can vouch for the box
    with pytest.raises(paramiko.SSHException):
        _connect_with(monkeypatch, sshd)
    _connect_with(monkeypatch, sshd, no_host_key_check=True)
