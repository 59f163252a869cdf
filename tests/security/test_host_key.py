"""The build box is verified by the per-build host key its user data gave it; anything else is refused.

Real boxes (``rehearsal.boxes``: the instance's own sshd, which took its host key from the user data
the product sent), reached through ``operators.hooks.box.box_ssh_hook`` exactly as every task does:
on the instance's public IP (the default), and through a tunnel (``ssh_address=connection``: a real
TCP forwarder standing in for an SSM port forward or a bastion).
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import paramiko
import pytest
from airflow.sdk import DAG
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from operator_harness import make_context, run_operator

from operators.build_box import LaunchBuildBox
from operators.hooks.box import box_ssh_hook
from operators.rules import naming

RUN_ID = "manual__2026-11-25T05:00:00+00:00"


def _run(box: dict[str, Any], command: str) -> str:
    """Run one command on the box over SSH as the tasks do; its stdout."""
    with closing(box_ssh_hook(box, ssh_conn_id="amibake_ssh").get_conn()) as client:
        _, stdout, _ = client.exec_command(command, timeout=30)
        out = stdout.read().decode().strip()
        assert stdout.channel.recv_exit_status() == 0, f"{command!r} failed on the box"
        return out


def _other_host_key() -> str:
    """Another ed25519 public key: same type as the box's, so only the key itself differs."""
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    return key.decode()


def test_the_per_build_host_key_is_accepted_and_the_login_is_a_non_root_sudoer(
    launched_box: tuple[dict[str, Any], Any],
) -> None:
    box, _ = launched_box
    assert _run(box, "id -un") == "ec2-user"  # the base AMI's default user, as cloud-init makes it
    assert _run(box, "sudo -n id -u") == "0"  # passwordless sudo, as the build needs
    assert _run(box, "pwd") == "/home/ec2-user"


def test_a_different_host_key_is_refused(launched_box: tuple[dict[str, Any], Any]) -> None:
    box, _ = launched_box
    other = _other_host_key()
    assert other != box["host_key"]
    with pytest.raises(paramiko.SSHException, match="(?i)host key"):
        _run({**box, "host_key": other}, "true")


def test_root_cannot_log_in_with_the_connection_key(
    launched_box: tuple[dict[str, Any], Any], box_login: Any
) -> None:
    """Only the image's default user got the key (cloud-init's disable_root): root is refused."""
    _, on_box = launched_box
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(box_login.private_key_pem))
    with closing(paramiko.Transport((on_box.address, 22))) as transport:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_publickey("root", key)


@contextmanager
def _tunnel(target: Callable[[], tuple[str, int]]) -> Iterator[dict[str, Any]]:
    """A TCP forwarder on 127.0.0.1 (the tunnel's local end); each connection goes to ``target()``,
    looked up when it arrives, as an SSM port forward follows its instance. Yields its port and the
    number of connections it carried."""
    listener = socket.create_server(("127.0.0.1", 0))
    state: dict[str, Any] = {"port": listener.getsockname()[1], "connections": 0}
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        """One direction; the sockets are closed by ``forward`` once both directions ended."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # a side reset the connection: this direction is over as well
            pass

    def forward(client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(target(), timeout=10)
        except Exception:  # noqa: BLE001 - no box behind the tunnel yet: the client sees a hang-up
            client.close()
            return
        upstream.settimeout(None)
        with client, upstream:
            pipes = [
                threading.Thread(target=pipe, args=(a, b), daemon=True)
                for a, b in ((client, upstream), (upstream, client))
            ]
            for each in pipes:
                each.start()
            for each in pipes:
                each.join()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            state["connections"] += 1
            threading.Thread(target=forward, args=(client,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=10)


@pytest.mark.long
def test_connection_mode_reaches_the_nightly_box_through_a_tunnel_and_pins_its_key(
    ec2: Any, boxes: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ssh_address=connection``: the connection's host/port is the tunnel's local end; the host key
    is still the per-build one from user data, so the same connection follows a new box each night
    and a box with another key behind the tunnel is refused."""
    client = ec2.boto3_client(recorded=True)  # the addresses EC2 shows are the boxes' (not moto's)

    def the_build_box() -> tuple[str, int]:
        """Where the tunnel leads: the running build box's private IP (an SSM forward by instance)."""
        filters = naming.project_filters(naming.Role.BUILD_BOX)
        filters.append({"Name": "instance-state-name", "Values": ["running"]})
        (reservation,) = client.describe_instances(Filters=filters)["Reservations"]
        return reservation["Instances"][0]["PrivateIpAddress"], 22  # a ValueError: no box (yet)

    with _tunnel(the_build_box) as tunnel:
        monkeypatch.setenv(
            "AIRFLOW_CONN_AMIBAKE_SSH",
            json.dumps({**box_login.connection(), "host": "127.0.0.1", "port": tunnel["port"]}),
        )
        monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_ADDRESS", "connection")
        monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", "")  # nothing is admitted from outside
        ami = ec2.register_base_image("amibake-test-base")
        for night in ("2026-11-25", "2026-11-26"):  # a new box (new address, new host key) each night
            run_id = f"scheduled__{night}T02:00:00+00:00"
            with DAG("amibake_t_tunnel", schedule=None) as dag:
                op = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=ami)
            box = run_operator(op, make_context(dag, run_id)).result
            on_box = boxes.get(box["instance_id"])
            assert (box["ssh_address"], box["address"], box["port"]) == (
                "connection",
                "127.0.0.1",
                tunnel["port"],
            )
            assert box["host_key"] == on_box.host_key
            before = tunnel["connections"]
            assert _run(box, "id -un") == "ec2-user"
            assert tunnel["connections"] == before + 1, "the session went through the tunnel"
            if night == "2026-11-25":  # the provider retries a refused key for ~8 s: check once
                with pytest.raises(paramiko.SSHException, match="(?i)host key"):
                    _run({**box, "host_key": _other_host_key()}, "true")
            boxes.terminate(box["instance_id"])
            client.terminate_instances(InstanceIds=[box["instance_id"]])
    assert ec2.calls("AuthorizeSecurityGroupIngress") == [], "the tunnel needs no inbound rule"
