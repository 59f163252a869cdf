"""Orchestration figures of amibake, measured on this machine and printed as a table.

1. Orchestration overhead of a rehearsal run: its wall time minus the time the build script spent in
   its phases (boot check included), in seconds and as a share of the wall time; and the share of the
   two boots in it: the boot check on the box (the build's ``bootcheck`` phase) and the smoke
   instance (the ``smoke_instance`` task: the registered AMI launched through the local EC2 API).
2. Parse time of ``dags/amibake_images.py`` with 1 and with 20 image definitions, against an empty
   DAG, median of fresh processes.
3. Worker slot-seconds of a run in which moto's instances, snapshots and AMIs take as long as on AWS
   (instance 60 s, snapshot 10 min, AMI 2 min): the time tasks held a worker slot, read from the task
   logs (from "Pre Execute" to the end of "Post Execute" of each execution, so deferred waits, which
   the triggerer carries, are excluded), next to the build script's own time.
4. EC2 API calls per run, as recorded by the local EC2 proxy.
5. The cost of a night with nothing changed (the rehearsal triggers the DAG again right after the
   green run: the fingerprint of its inputs is the verified AMI's, so nothing is built): wall time,
   worker slot-seconds and EC2 calls (and how many change something: none), next to the full night.

Usage (root, after ``bin/setup``)::

    .venv/bin/python benchmarks/orchestration.py            # two rehearsal runs, ~20 min
    .venv/bin/python benchmarks/orchestration.py --smoke    # one run, latencies / 20, no boot check

This prints figures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rehearsal.__main__ import (  # noqa: E402
    BASE_IMAGE_NAME,
    DAG_ID,
    SMOKE_TASK,
    Options,
    RunResult,
    mutating_calls,
    rehearse,
    unchanged_problem,
)

BUILD_TASK = "remote_chroot_build"
PHASE_RE = re.compile(r"phase (\S+) finished in ([0-9.]+) s")
#: Simulated AWS latencies in seconds (what the issue asks for).
AWS_LATENCIES = {"instance": 60.0, "snapshot": 600.0, "image": 120.0}
EMPTY_DAG = textwrap.dedent(
    """
    from airflow.sdk import DAG

    with DAG(dag_id="empty", schedule=None):
        pass
    """
)
PARSE_PROBE = textwrap.dedent(
    """
    import sys, time
    from airflow.dag_processing.dagbag import DagBag
    start = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    elapsed = time.perf_counter() - start
    assert not bag.import_errors and len(bag.dags) == int(sys.argv[2]), (bag.import_errors, list(bag.dags))
    print(elapsed)
    """
)


class MotoLag:
    """Makes moto's new instances, snapshots and AMIs take time to become ready, as AWS does.

    moto marks them ready at once; this thread (in the process that runs moto) sets each new one
    pending and flips it to ready after the given delay, so the DAG's deferred waits really wait.
    """

    def __init__(self, region: str, instance_s: float, snapshot_s: float, image_s: float) -> None:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        self.backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
        self.delays = {"instance": instance_s, "snapshot": snapshot_s, "image": image_s}
        self.seen: set[str] = set(self.backend.amis) | set(self.backend.snapshots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._timers: list[threading.Timer] = []

    def __enter__(self) -> MotoLag:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for timer in self._timers:
            timer.cancel()

    def _later(self, seconds: float, action: Any) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _loop(self) -> None:
        from moto.ec2.models.instances import InstanceState

        while not self._stop.wait(0.05):
            for inst in self.backend.all_instances():
                if inst.id not in self.seen and inst._state.name == "running":
                    self.seen.add(inst.id)
                    inst._state = InstanceState("pending", 0)

                    def run(i: Any = inst) -> None:
                        if i._state.name == "pending":
                            i._state = InstanceState("running", 16)

                    self._later(self.delays["instance"], run)
            for snap in list(self.backend.snapshots.values()):
                if snap.id not in self.seen:
                    self.seen.add(snap.id)
                    snap.status = "pending"
                    self._later(self.delays["snapshot"], lambda s=snap: setattr(s, "status", "completed"))
            for ami in list(self.backend.amis.values()):
                if ami.id not in self.seen and ami.name != BASE_IMAGE_NAME:
                    self.seen.add(ami.id)
                    ami.state = "pending"
                    self._later(self.delays["image"], lambda a=ami: setattr(a, "state", "available"))


def _ts(value: str) -> datetime:
    """An ISO timestamp from a task log."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def task_logs(result: RunResult, home: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every task try's structured log, read from the rehearsal's log folder."""
    import json

    logs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    run_dir = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={result.run_id}"
    for path in run_dir.glob("task_id=*/attempt=*.log"):
        match = re.fullmatch(r"attempt=(\d+)\.log", path.name)  # not the triggerer's *.trigger.*.log
        if not match:
            continue
        task = path.parent.name.removeprefix("task_id=")
        attempt = int(match.group(1))
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        logs[(task, attempt)] = lines
    return logs


def build_seconds(logs: dict[tuple[str, int], list[dict[str, Any]]], phase: str | None = None) -> float:
    """Seconds the build script spent in its phases (boot check included), or in one ``phase``,
    from its progress lines."""
    total = 0.0
    for (task, _), events in logs.items():
        if task == BUILD_TASK:
            for event in events:
                match = PHASE_RE.search(str(event.get("event", "")))
                if match and phase in (None, match.group(1)):
                    total += float(match.group(2))
    return total


def task_seconds(result: RunResult, task_id: str) -> float:
    """Duration of one task of the run (0 when it did not run)."""
    return sum(float(ti.get("duration") or 0.0) for ti in result.tasks if ti["task_id"] == task_id)


def slot_seconds(logs: dict[tuple[str, int], list[dict[str, Any]]]) -> float:
    """Seconds tasks held a worker slot: each execution from "Pre Execute" to the end of "Post Execute"."""
    total = 0.0
    for events in logs.values():
        start = None
        in_post = False
        for event in events:
            text, stamp = event.get("event"), event.get("timestamp")
            if not stamp:
                continue
            if text == "::group::Pre Execute":
                start, in_post = _ts(stamp), False
            elif text == "::group::Post Execute":
                in_post = True
            elif text == "::endgroup::" and in_post and start is not None:
                total += (_ts(stamp) - start).total_seconds()
                start, in_post = None, False
    return total


def parse_seconds(dag_file: Path, repeats: int, images_dir: Path | None = None, dags: int = 1) -> float:
    """Median seconds a fresh process's DagBag takes to parse one DAG file (with these definitions),
    which must make ``dags`` DAGs."""
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    if images_dir is not None:
        env["AIRFLOW__AMIBAKE__IMAGES_DIR"] = str(images_dir)
    times = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PARSE_PROBE, str(dag_file), str(dags)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.median(times)


def definitions(folder: Path, count: int) -> Path:
    """``count`` copies of the shipped debian12 definition (img01, img02 ...) in ``folder``."""
    text = (REPO / "images" / "debian12.yaml").read_text()
    folder.mkdir()
    for n in range(1, count + 1):
        name = f"img{n:02d}"
        (folder / f"{name}.yaml").write_text(re.sub(r"(?m)^name: .*$", f"name: {name}", text, count=1))
    return folder


def one_run(opts: Options, lag: dict[str, float] | None) -> tuple[RunResult, dict]:
    """A rehearsal run (moto in this process when latencies are simulated); returns it and its logs."""
    if lag is None:
        result = rehearse(opts)
    else:
        from rehearsal.ec2_local import DEFAULT_REGION

        with MotoLag(DEFAULT_REGION, lag["instance"], lag["snapshot"], lag["image"]):
            result = rehearse(opts)
    if result.state != "success":
        raise SystemExit(f"benchmark run {result.run_id} ended {result.state}: {result.failed}")
    return result, task_logs(result, opts.state_dir / "airflow")


def unchanged_rows(full: RunResult, home: Path) -> list[tuple[str, str]]:
    """The next night with nothing changed, next to the full build it followed."""
    night = full.unchanged
    if night is None or unchanged_problem(full):
        raise SystemExit(
            f"benchmark: the unchanged night did not skip: {unchanged_problem(full) or 'not run'}"
        )
    full_slots, night_slots = slot_seconds(task_logs(full, home)), slot_seconds(task_logs(night, home))
    return [
        (
            "full night (the run above): wall / worker slot-seconds",
            f"{full.wall_seconds:.1f} s / {full_slots:.1f} s",
        ),
        ("next night, nothing changed: wall", f"{night.wall_seconds:.1f} s"),
        ("  worker slot-seconds", f"{night_slots:.1f} s"),
        (
            "  EC2 API calls (of which changing something)",
            f"{len(night.ec2_calls)} ({len(mutating_calls(night))})",
        ),
    ]


def _share(seconds: float, wall: float) -> str:
    """Seconds and their share of the wall time."""
    return f"{seconds:.1f} s ({seconds / wall:.0%})" if wall else f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="one run, latencies / 20, no boot check (CI)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="parses per DAG file (median)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root (the rehearsal needs loop devices)")

    with tempfile.TemporaryDirectory(prefix="amibake-bench-") as tmp:
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        dag_file = REPO / "dags" / "amibake_images.py"
        parse_one = parse_seconds(dag_file, args.repeats, definitions(Path(tmp) / "one", 1))
        parse_twenty = parse_seconds(dag_file, args.repeats, definitions(Path(tmp) / "twenty", 20), dags=20)
        parse_empty = parse_seconds(empty, args.repeats)

    scale = 20.0 if args.smoke else 1.0
    lag = {k: v / scale for k, v in AWS_LATENCIES.items()}
    # the smoke instance runs in --smoke too: only a verified AMI lets the next night skip
    opts = Options(boot_check=not args.smoke, ec2_in_process=True, conf={"smoke_check": True})
    if args.smoke:
        plain, plain_logs = one_run(opts, lag)
        slow, slow_logs = plain, plain_logs
    else:
        plain, plain_logs = one_run(opts, None)
        slow, slow_logs = one_run(opts, lag)

    build = build_seconds(plain_logs)
    boot = build_seconds(plain_logs, "bootcheck")
    smoke = task_seconds(plain, SMOKE_TASK)
    overhead = plain.wall_seconds - build
    slow_build = build_seconds(slow_logs)
    calls = Counter(c["action"] for c in plain.ec2_calls)
    by_action = ", ".join(f"{action} {n}" for action, n in calls.most_common())
    lag_text = ", ".join(f"{k} {v:.0f} s" for k, v in lag.items())
    rows = [
        (
            "rehearsal run wall time" + (" (with the simulated waits)" if args.smoke else ""),
            f"{plain.wall_seconds:.1f} s",
        ),
        ("  build script phases (boot check " + ("off" if args.smoke else "on") + ")", f"{build:.1f} s"),
        ("  orchestration overhead", f"{overhead:.1f} s ({overhead / plain.wall_seconds:.0%})"),
        ("  boot check on the box (phase bootcheck)", _share(boot, plain.wall_seconds)),
        (f"  smoke instance of the AMI (task {SMOKE_TASK})", _share(smoke, plain.wall_seconds)),
        ("  the two boots together", _share(boot + smoke, plain.wall_seconds)),
        ("DAG parse: amibake_images.py, 1 image definition (median)", f"{parse_one * 1000:.0f} ms"),
        ("DAG parse: amibake_images.py, 20 image definitions (median)", f"{parse_twenty * 1000:.0f} ms"),
        ("DAG parse: empty DAG (median)", f"{parse_empty * 1000:.0f} ms"),
        (f"run with simulated AWS waits ({lag_text}): wall", f"{slow.wall_seconds:.1f} s"),
        ("  worker slot-seconds (deferred waits excluded)", f"{slot_seconds(slow_logs):.1f} s"),
        ("  of which the build script", f"{slow_build:.1f} s"),
        ("EC2 API calls per run", f"{len(plain.ec2_calls)} ({by_action})"),
        *unchanged_rows(plain, opts.state_dir / "airflow"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
