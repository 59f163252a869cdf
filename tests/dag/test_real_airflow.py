"""Under a real Airflow: ``rehearsal.airflow_env.LocalAirflow`` (api-server, scheduler, dag-processor,
triggerer, LocalExecutor on SQLite), started once for the module and stopped at its end with nothing
of it left running. One deployment serves the three tests, since each start costs about 20 CPU-s
here; each test reads only its own DAGs.

- ``rehearsal_probe`` (written here) defers to the triggerer and then reads the connections and
  settings LocalAirflow gives every process: the harness does what the rehearsal relies on.
- The product's DAG file reads ``[amibake] images_dir``: a copy of the shipped definitions plus one
  broken file. The good definitions' DAGs parse as usual; the broken one is a DAG of its own id whose
  description names the file and the field, that never runs on a schedule, and whose one task fails
  with the same error when someone triggers it. There is no import error: the DAG file itself is
  fine, and an import error would have taken every image's DAG away with it.
- ``amibake_deadline_probe`` (written here) has one task that sleeps far past a 5 s
  ``DeadlineAlert`` with the SAME callback as the nightly (``AsyncCallback(notify.deadline_missed)``).
  The scheduler sees the deadline pass and queues the callback, the triggerer runs it, and
  ``deadline_missed`` hands the context to the notifier named by ``[amibake] notifier``:
  ``recording_notifier.FileNotifier`` (tests/dag, put on the processes' PYTHONPATH), which appends a
  JSON line to a file. Airflow 3.3 calls the callback as
  ``deadline_missed(context={"dag_run": {...}, "deadline": {...}})``: ``dag_run`` is the run as the
  REST API shows it, ``deadline`` has its ``id`` and ``deadline_time``; there is no task context.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rehearsal import processes
from rehearsal.__main__ import _marked_processes, _q, follow, trigger, wait_for_dag, xcom_values
from rehearsal.airflow_env import MARKER_ENV, REHEARSAL_SETTINGS, REPO, LocalAirflow, amibake_env

#: One worker runs the module, so its deployment (a module fixture) is started once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real-airflow")]

# A DAG with a deferrable wait: it can only finish if the triggerer really runs the trigger.
PROBE_DAG = textwrap.dedent(
    """
    from datetime import timedelta

    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
    from airflow.sdk import BaseOperator, dag, task


    class Wait(BaseOperator):
        def execute(self, context):
            self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=8)), method_name="done")

        def done(self, context, event=None):
            return "resumed"


    @dag(dag_id="rehearsal_probe", schedule=None)
    def probe():
        @task
        def settings():
            from airflow.sdk import BaseHook, conf

            aws = BaseHook.get_connection("amibake_aws")
            endpoint = aws.extra_dejson["endpoint_url"]
            return {"ssh_address": conf.get("amibake", "ssh_address"), "endpoint": endpoint}

        Wait(task_id="wait") >> settings()


    probe()
    """
)
DEADLINE_DAG_ID = "amibake_deadline_probe"
DEADLINE_DAG = textwrap.dedent(
    f"""
    import time
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, dag, task

    from operators import notify


    @dag(
        dag_id="{DEADLINE_DAG_ID}",
        schedule=None,
        deadline=DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(seconds=5),
            callback=AsyncCallback(notify.deadline_missed),
        ),
    )
    def probe():
        @task
        def slow():
            time.sleep(40)

        slow()


    probe()
    """
)
BROKEN = """\
name: broken
description: a definition with a hostile package name
recipe: debian12
packages:
  install: [curl, "nginx; reboot"]
"""
ENDPOINT = "http://127.0.0.1:9"  # never called: the probe only reads the connection
RUN_WAIT_S = 300.0
NOTIFY_WAIT_S = 180.0


@dataclass(frozen=True)
class Deployment:
    """The module's running Airflow, the pids it reported when it spawned its processes, and the
    file the notifier writes."""

    airflow: LocalAirflow
    spawned: list[int]
    work: Path
    notifications: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The module's LocalAirflow; stopped at the end, when none of its processes may be left."""
    work = tmp_path_factory.mktemp("real-airflow")
    dags = work / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "amibake_images.py", dags)
    (dags / "probe.py").write_text(PROBE_DAG)
    (dags / "deadline_probe.py").write_text(DEADLINE_DAG)
    images = work / "images"
    shutil.copytree(REPO / "images", images, ignore=shutil.ignore_patterns("examples"))
    (images / "broken.yaml").write_text(BROKEN)
    notifications = work / "notifications.jsonl"
    settings = {
        **REHEARSAL_SETTINGS,
        "images_dir": str(images),
        "notifier": "recording_notifier.FileNotifier",
        "notifier_kwargs": json.dumps({"path": str(notifications)}),
    }
    env = amibake_env(
        aws_extra={"endpoint_url": ENDPOINT, "region_name": "us-east-1"},
        ssh_connection={"conn_type": "ssh", "host": "127.0.0.1"},
        settings=settings,
    )
    pythonpath = [str(REPO / "tests" / "dag"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update({MARKER_ENV: str(work), "PYTHONPATH": os.pathsep.join(pythonpath)})
    spawned: list[int] = []
    airflow = LocalAirflow(work / "home", env, dags_folder=dags, on_spawn=spawned.append)
    try:
        airflow.start()
        yield Deployment(airflow, spawned, work, notifications)
    finally:
        airflow.stop()
    assert _marked_processes(work) == [], "Airflow processes left running"
    assert processes.members(spawned) == []


def test_local_airflow_runs_a_deferred_dag_through_the_rest_api(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """The processes LocalAirflow reported are the ones it runs; a triggered run defers, the triggerer
    resumes it, and its tasks see the connections and settings LocalAirflow gave them."""
    airflow = deployment.airflow
    assert deployment.spawned == [proc.pid for proc in airflow.procs.values()]
    # their sessions hold more than the marker shows: workers and log servers rewrite their
    # process title over their environment
    assert set(_marked_processes(deployment.work)) < set(processes.members(deployment.spawned))
    wait_for_dag(airflow, "rehearsal_probe")
    run_id = trigger(airflow, "rehearsal_probe", {})
    assert follow(airflow, "rehearsal_probe", run_id, timeout=RUN_WAIT_S) == "success"
    assert xcom_values(airflow, "rehearsal_probe", run_id) == {
        "wait": "resumed",  # resumed after the triggerer fired the trigger
        "settings": {"ssh_address": REHEARSAL_SETTINGS["ssh_address"], "endpoint": ENDPOINT},
    }
    # follow() saw it deferred; only the triggerer process can have fired the trigger that resumed it
    out = capsys.readouterr().out
    assert re.search(r"wait +deferred", out), out


def test_a_broken_definition_is_shown_and_isolated_by_the_real_dag_processor(deployment: Deployment) -> None:
    airflow = deployment.airflow
    for dag_id in ("amibake_centos7", "amibake_debian12", "amibake_broken"):
        wait_for_dag(airflow, dag_id)  # raises on any import error

    good = airflow.request("GET", "/api/v2/dags/amibake_debian12")
    assert good["timetable_summary"] not in (None, "None"), good
    assert "broken-definition" not in {t["name"] for t in good["tags"]}
    broken = airflow.request("GET", "/api/v2/dags/amibake_broken")
    assert broken["description"].startswith("BROKEN DEFINITION"), broken
    assert "broken.yaml" in broken["description"] and "packages.install[1]" in broken["description"]
    assert broken["timetable_summary"] in (None, "None"), "a broken definition must never run at night"
    assert "broken-definition" in {t["name"] for t in broken["tags"]}
    assert airflow.request("GET", "/api/v2/importErrors")["total_entries"] == 0

    run_id = trigger(airflow, "amibake_broken", {})
    assert follow(airflow, "amibake_broken", run_id, timeout=RUN_WAIT_S) == "failed"
    run_dir = airflow.log_dir / "dag_id=amibake_broken" / f"run_id={run_id}"
    task_logs = run_dir / "task_id=definition_error"
    text = "\n".join(p.read_text(errors="replace") for p in task_logs.rglob("*.log"))
    assert "packages.install[1]" in text and "broken.yaml" in text, text[-3000:]


def _deadline_notes(deployment: Deployment) -> list[dict[str, Any]]:
    """The notifier's deadline alerts so far (the broken run's failure is told to it too)."""
    path = deployment.notifications
    lines = path.read_text().splitlines() if path.exists() else []
    notes = [json.loads(line) for line in lines if line.strip()]
    return [note for note in notes if note.get("kind") == "deadline_missed"]


def test_a_missed_deadline_reaches_the_configured_notifier(deployment: Deployment) -> None:
    """Scheduler + triggerer run the nightly's deadline callback, which notifies the configured notifier."""
    airflow = deployment.airflow
    wait_for_dag(airflow, DEADLINE_DAG_ID)
    run_id = trigger(airflow, DEADLINE_DAG_ID, {})

    end = time.monotonic() + NOTIFY_WAIT_S
    while not (notes := _deadline_notes(deployment)):
        airflow.check_alive()
        if time.monotonic() > end:
            log = (airflow.log_dir / "triggerer.log").read_text(errors="replace").splitlines()[-60:]
            raise AssertionError(
                f"no deadline alert within {NOTIFY_WAIT_S:.0f} s; triggerer log tail:\n" + "\n".join(log)
            )
        time.sleep(1)

    assert len(notes) == 1, notes
    note = notes[0]
    assert (note["dag_id"], note["run_id"]) == (DEADLINE_DAG_ID, run_id), note
    assert note["deadline_id"], note
    assert note["deadline_time"] not in ("", "None"), note
    # Airflow's context for a missed deadline; the notifier adds its own template fields to it
    assert {"dag_run", "deadline"} <= set(note["context_keys"]), note
    # the deadline it reports is the probe's own: 5 s after the run was queued
    run = airflow.request("GET", f"/api/v2/dags/{DEADLINE_DAG_ID}/dagRuns/{_q(run_id)}")
    queued_at = datetime.fromisoformat(run["queued_at"].replace("Z", "+00:00"))
    assert datetime.fromisoformat(note["deadline_time"]) == queued_at + timedelta(seconds=5), note
