"""operators/metrics.py through Airflow's real metrics channel: a StatsD client configured by
``[metrics]`` (env, as a deployment sets it), its datagrams caught on a UDP socket of 127.0.0.1.

Run in a fresh interpreter: Airflow builds its metrics backend once per process from the
configuration it finds then.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EMIT = """
from operators import metrics
metrics.count("web", "unchanged_skip")
metrics.count("web", "ami.deregistered", 2)
metrics.count("web", "ami.deprecated", 0)
metrics.phases("web", {"bootstrap": 12.5, "bootcheck": 3.0})
metrics.duration("web", "smoke_check", 1.25)
metrics.swept({"instance": 1, "volume": 0, "snapshot": 3})
"""


def test_metrics_reach_statsd_as_configured() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        env = {
            **os.environ,
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(udp.getsockname()[1]),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        }
        subprocess.run([sys.executable, "-c", EMIT], env=env, cwd=REPO, check=True, timeout=120)
        got: set[str] = set()
        udp.settimeout(2)
        try:
            while True:
                got |= set(udp.recv(65536).decode().splitlines())
        except TimeoutError:
            pass
    ours = {line for line in got if line.startswith("airflow.amibake.")}
    assert ours == {
        "airflow.amibake.web.unchanged_skip:1|c",
        "airflow.amibake.web.ami.deregistered:2|c",
        "airflow.amibake.web.phase.bootstrap:12500.000000|ms",
        "airflow.amibake.web.phase.bootcheck:3000.000000|ms",
        "airflow.amibake.web.smoke_check:1250.000000|ms",
        "airflow.amibake.sweeper.swept.instance:1|c",
        "airflow.amibake.sweeper.swept.snapshot:3|c",
    }, got
