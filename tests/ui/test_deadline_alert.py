"""A missed deadline really reaches the deployment's notifier, under a real scheduler and triggerer.

``rehearsal.airflow_env.LocalAirflow`` (api-server, scheduler, dag-processor, triggerer on SQLite)
parses a tiny DAG written here whose only task sleeps far past a 5 s ``DeadlineAlert`` with the SAME
callback as the nightly (``AsyncCallback(notify.deadline_missed)``). The scheduler sees the deadline
pass and queues the callback, the triggerer runs it, and ``deadline_missed`` hands the context to
the notifier named by ``[amibake] notifier``: ``recording_notifier.FileNotifier`` (tests/dag, put on
the processes' PYTHONPATH), which appends a JSON line to a temp file.

Airflow 3.3 calls the callback as ``deadline_missed(context={"dag_run": {...}, "deadline": {...}})``:
``dag_run`` is the run as the REST API shows it (a dict: ``dag_run_id``, ``dag_id``, ``queued_at``,
...), ``deadline`` has its ``id`` and ``deadline_time``; there is no task context.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rehearsal.__main__ import _marked_processes, _q, trigger, wait_for_dag
from rehearsal.airflow_env import MARKER_ENV, REPO, LocalAirflow, setting_env_var

DAG_ID = "amibake_deadline_probe"
NOTIFY_WAIT_S = 180.0

PROBE_DAG = textwrap.dedent(
    f"""
    import time
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, dag, task

    from operators import notify


    @dag(
        dag_id="{DAG_ID}",
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


def _notifications(path: Path) -> list[dict[str, Any]]:
    """The JSON lines the FileNotifier wrote so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_notification(airflow: LocalAirflow, path: Path, timeout: float) -> list[dict[str, Any]]:
    """Poll the notifier's file (bounded); raise with the triggerer's log tail if nothing comes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        airflow.check_alive()
        found = _notifications(path)
        if found:
            return found
        time.sleep(1)
    log = (airflow.log_dir / "triggerer.log").read_text(errors="replace").splitlines()[-60:]
    raise AssertionError(
        f"no notification in {path} within {timeout:.0f} s; triggerer log tail:\n" + "\n".join(log)
    )


@pytest.mark.slow
def test_a_missed_deadline_reaches_the_configured_notifier() -> None:
    """Scheduler + triggerer run the nightly's deadline callback, which notifies the configured notifier."""
    work = Path(tempfile.mkdtemp(prefix="amibake-deadline-"))
    airflow: LocalAirflow | None = None
    try:
        dags = work / "dags"
        dags.mkdir()
        (dags / "deadline_probe.py").write_text(PROBE_DAG)
        out = work / "notifications.jsonl"
        pythonpath = [str(REPO / "tests" / "dag"), str(REPO)]
        if os.environ.get("PYTHONPATH"):
            pythonpath.append(os.environ["PYTHONPATH"])
        env = {
            MARKER_ENV: str(work),
            "PYTHONPATH": os.pathsep.join(pythonpath),
            setting_env_var("notifier"): "recording_notifier.FileNotifier",
            setting_env_var("notifier_kwargs"): json.dumps({"path": str(out)}),
        }
        airflow = LocalAirflow(work / "home", env, dags_folder=dags)
        airflow.start()
        wait_for_dag(airflow, DAG_ID)
        run_id = trigger(airflow, DAG_ID, {})

        notes = _wait_for_notification(airflow, out, NOTIFY_WAIT_S)

        assert len(notes) == 1, notes
        note = notes[0]
        assert note["kind"] == "deadline_missed", note
        assert note["dag_id"] == DAG_ID, note
        assert note["run_id"] == run_id, note
        assert note["deadline_id"], note
        assert note["deadline_time"] not in ("", "None"), note
        # Airflow's context for a missed deadline; the notifier adds its own template fields to it
        assert {"dag_run", "deadline"} <= set(note["context_keys"]), note
        # the deadline it reports is the probe's own: 5 s after the run was queued
        run = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{_q(run_id)}")
        queued_at = datetime.fromisoformat(run["queued_at"].replace("Z", "+00:00"))
        assert datetime.fromisoformat(note["deadline_time"]) == queued_at + timedelta(seconds=5), note
    finally:
        if airflow is not None:
            airflow.stop()
        strays = _marked_processes(work)
        shutil.rmtree(work, ignore_errors=True)
    assert strays == [], f"Airflow processes left running: {strays}"
