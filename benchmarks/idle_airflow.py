"""CPU that the rehearsal's Airflow spends while no DAG runs, per process, in CPU-seconds per minute.

Every test and rehearsal that starts a ``LocalAirflow`` pays this for as long as it keeps it up, on
top of the work its runs do; the suite keeps several up at once. The figure is each process's session
(the process, what it forked and the children it reaped), measured over ``--seconds`` after a
settling pause. Extra ``KEY=VALUE`` arguments go to Airflow's environment, to compare settings.

Usage (after ``bin/setup``)::

    .venv/bin/python benchmarks/idle_airflow.py
    .venv/bin/python benchmarks/idle_airflow.py AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL=30

This prints figures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rehearsal import processes  # noqa: E402
from rehearsal.airflow_env import LocalAirflow  # noqa: E402

SETTLE_S = 20


def session_cpu(leader: int) -> float:
    """CPU-seconds of every live member of ``leader``'s session."""
    return sum(processes.cpu_seconds(pid) for pid in processes.members([leader]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to measure (default 90)")
    parser.add_argument("env", nargs="*", metavar="KEY=VALUE", help="extra Airflow environment")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="amibake-idle-") as home:
        airflow = LocalAirflow(Path(home), extra)
        airflow.start()
        try:
            leaders = {name: proc.pid for name, proc in airflow.procs.items()}
            time.sleep(SETTLE_S)
            before = {name: session_cpu(pid) for name, pid in leaders.items()}
            time.sleep(args.seconds)
            per_minute = {
                name: (session_cpu(pid) - before[name]) * 60 / args.seconds for name, pid in leaders.items()
            }
        finally:
            airflow.stop()
    settings = f" with {extra}" if extra else ""
    print(f"idle rehearsal Airflow, CPU-s per minute over {args.seconds:.0f} s{settings}")
    for name, cpu in per_minute.items():
        print(f"  {name:<14} {cpu:5.2f}")
    print(f"  {'all':<14} {sum(per_minute.values()):5.2f}")


if __name__ == "__main__":
    main()
