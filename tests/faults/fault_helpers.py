"""Helpers of the fault tests: age a build's resources, list what is left of it, run the sweeper,
run a task try in a worker process and kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from operators.rules import naming

REPO = Path(__file__).resolve().parents[2]
READS = ("Describe", "Get")


def age(client: Any, build: str, hours: float) -> list[str]:
    """Rewrite ``amibake:created-at`` of every resource of a build to ``hours`` ago (time passing)."""
    when = (datetime.now(UTC) - timedelta(hours=hours)).replace(microsecond=0).isoformat()
    found = [i for ids in left(client, build, include_terminated=True).values() for i in ids]
    client.create_tags(Resources=found, Tags=[{"Key": naming.TAG_CREATED_AT, "Value": when}])
    return found


def left(client: Any, build: str, *, include_terminated: bool = False) -> dict[str, list[str]]:
    """What of a build exists (terminated instances count only with ``include_terminated``)."""
    ours = [{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    return {
        "instances": [
            i["InstanceId"]
            for r in client.describe_instances(Filters=ours)["Reservations"]
            for i in r["Instances"]
            if include_terminated or i["State"]["Name"] != "terminated"
        ],
        "volumes": [v["VolumeId"] for v in client.describe_volumes(Filters=ours)["Volumes"]],
        "security_groups": [
            g["GroupId"] for g in client.describe_security_groups(Filters=ours)["SecurityGroups"]
        ],
        "snapshots": [
            s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"], Filters=ours)["Snapshots"]
        ],
        "images": [i["ImageId"] for i in client.describe_images(Owners=["self"], Filters=ours)["Images"]],
    }


def nothing_left() -> dict[str, list[str]]:
    return {"instances": [], "volumes": [], "security_groups": [], "snapshots": [], "images": []}


def touched(requests: list[dict[str, Any]]) -> set[str]:
    """Every resource id named by a recorded call that changes something."""
    return {
        v
        for r in requests
        if not r["action"].startswith(READS)
        for k, v in r["params"].items()
        if k.split(".")[0].endswith("Id")
    }


def images(client: Any) -> dict[str, dict]:
    """Every AMI of the account by id, as described."""
    return {i["ImageId"]: i for i in client.describe_images(Owners=["self"])["Images"]}


def run_sweeper(max_age_hours: float = 6) -> Any:
    """One real run of dags/amibake_sweeper.py (dag.test: the Task SDK answers the run-state question)."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags" / "amibake_sweeper.py")).dags["amibake_sweeper"]
    return dag.test(run_after=datetime.now(UTC), run_conf={"max_age_hours": max_age_hours})


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``condition`` until it returns something truthy (a wait for an event, not a timing check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")


@dataclass
class Worker:
    """One task try running in its own process (tests/faults/worker.py)."""

    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(
    tmp_path: Path, operator: str, task_id: str, kwargs: dict, dag_id: str, run_id: str
) -> Worker:
    """Start a worker process running ``operator`` (dotted class path) as try 1 of ``task_id``."""
    spec = {"operator": operator, "task_id": task_id, "kwargs": kwargs, "dag_id": dag_id, "run_id": run_id}
    spec |= {"try_number": 1, "max_tries": 3}
    spec_file = tmp_path / f"{task_id}.json"
    spec_file.write_text(json.dumps(spec))
    log = tmp_path / f"{task_id}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("worker.py")), str(spec_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    return Worker(proc, log)


def kill_when(worker: Worker, condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """SIGKILL the worker as soon as ``condition`` holds; fail if the worker ended first."""

    def seen() -> Any:
        if worker.proc.poll() is not None:
            raise AssertionError(
                f"worker ended (rc {worker.proc.returncode}) before {what}:\n{worker.output()[-3000:]}"
            )
        return condition()

    try:
        value = wait_until(seen, what, timeout)
    finally:
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
    assert worker.proc.returncode == -signal.SIGKILL
    return value


def build_image_pids(volume_id: str) -> list[int]:
    """Processes on this "box" running build-image for ``volume_id`` (from /proc cmdlines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a.endswith(b"build-image") for a in argv) and volume_id.encode() in argv:
            found.append(int(entry.name))
    return found
