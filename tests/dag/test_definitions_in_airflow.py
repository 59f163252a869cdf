"""A bad image definition never takes the others down, under the real dag-processor.

``rehearsal.airflow_env.LocalAirflow`` (api-server, scheduler, dag-processor, triggerer on SQLite)
parses the product's ``dags/`` with ``[amibake] images_dir`` pointing at a copy of the shipped
definitions plus one broken file. The good definitions' DAGs parse as usual; the broken one is a DAG
of its own id whose description names the file and the field, that never runs on a schedule, and
whose one task fails with the same error when someone triggers it. There is no import error: the DAG
file itself is fine, and an import error would have taken every image's DAG away with it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from rehearsal.__main__ import _marked_processes, _q, trigger, wait_for_dag
from rehearsal.airflow_env import MARKER_ENV, REPO, LocalAirflow, setting_env_var

BROKEN = """\
name: broken
description: a definition with a hostile package name
recipe: debian12
packages:
  install: [curl, "nginx; reboot"]
"""
RUN_WAIT_S = 180.0


def _final_state(airflow: LocalAirflow, dag_id: str, run_id: str, timeout: float) -> str:
    """Poll the run (bounded) until it ends; its state."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        airflow.check_alive()
        state = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}")["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(1)
    raise AssertionError(f"{dag_id} run {run_id} did not end within {timeout:.0f} s")


@pytest.mark.slow
def test_a_broken_definition_is_shown_and_isolated_by_the_real_dag_processor() -> None:
    work = Path(tempfile.mkdtemp(prefix="amibake-definitions-"))
    airflow: LocalAirflow | None = None
    try:
        images = work / "images"
        shutil.copytree(REPO / "images", images, ignore=shutil.ignore_patterns("examples"))
        (images / "broken.yaml").write_text(BROKEN)
        env = {MARKER_ENV: str(work), setting_env_var("images_dir"): str(images)}
        airflow = LocalAirflow(work / "home", env, dags_folder=REPO / "dags")
        airflow.start()
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
        assert _final_state(airflow, "amibake_broken", run_id, RUN_WAIT_S) == "failed"
        run_dir = airflow.log_dir / "dag_id=amibake_broken" / f"run_id={run_id}"
        task_logs = run_dir / "task_id=definition_error"
        text = "\n".join(p.read_text(errors="replace") for p in task_logs.rglob("*.log"))
        assert "packages.install[1]" in text and "broken.yaml" in text, text[-3000:]
    finally:
        if airflow is not None:
            airflow.stop()
        strays = _marked_processes(work)
        shutil.rmtree(work, ignore_errors=True)
    assert strays == [], f"Airflow processes left running: {strays}"
