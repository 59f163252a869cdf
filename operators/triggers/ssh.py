"""``SshReachableTrigger``: wait in the triggerer until the build box answers with an SSH banner."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from operators import defaults


async def ssh_banner(host: str, port: int, timeout: float) -> str:
    """The SSH identification line a server sends first ('' if it sent something else)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    text = line.decode(errors="replace").strip()
    return text if text.startswith("SSH-") else ""


def ssh_banner_now(host: str, port: int, timeout: float = 5.0) -> str:
    """One blocking look for the SSH identification line ('' when nothing, or no SSH, answers)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            line = sock.makefile("rb").readline()
    except OSError:
        return ""
    text = line.decode(errors="replace").strip()
    return text if text.startswith("SSH-") else ""


class SshReachableTrigger(BaseTrigger):
    """Wait until ``host:port`` answers with an SSH banner, polling until ``timeout`` seconds.

    ``instance_id`` is only passed through into the event, so the resumed task knows its box.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        timeout: float = defaults.SSH_READY_TIMEOUT_S,
        poll_interval: float = defaults.SSH_POLL_INTERVAL_S,
        instance_id: str = "",
    ) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and arguments, so the triggerer can rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "host": self.host,
                "port": self.port,
                "timeout": self.timeout,
                "poll_interval": self.poll_interval,
                "instance_id": self.instance_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll the port until a banner arrives or the time is up."""
        deadline = time.monotonic() + self.timeout
        last_error = "no answer"
        while True:
            try:
                banner = await ssh_banner(self.host, self.port, defaults.SSH_CONNECT_TIMEOUT_S)
                if banner:
                    yield TriggerEvent(
                        {"status": "success", "banner": banner, "instance_id": self.instance_id}
                    )
                    return
                last_error = "not an SSH server"
            except (TimeoutError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                yield TriggerEvent(
                    {
                        "status": "error",
                        "instance_id": self.instance_id,
                        "message": f"{self.host}:{self.port} did not answer on SSH within "
                        f"{self.timeout:.0f} s ({last_error})",
                    }
                )
                return
            self.log.info("waiting for SSH on %s:%s (%s)", self.host, self.port, last_error)
            await asyncio.sleep(self.poll_interval)
