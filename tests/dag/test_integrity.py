"""DAG integrity: the DAG folder imports cleanly, parses light, and is wired as designed."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "amibake_images.py"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dag_folder_imports_without_errors(dagbag) -> None:
    """One DAG per shipped image definition (images/*.yaml), plus the sweeper."""
    assert dagbag.import_errors == {}
    assert {"amibake_centos7", "amibake_debian12", "amibake_sweeper"} <= set(dagbag.dags)


@pytest.mark.parametrize(
    "args",
    [
        ["--select", "AIR", "dags", "operators"],  # Airflow 3 rules over everything Airflow imports
        ["dags"],  # the repository's full rule set over the DAG folder
    ],
)
def test_ruff_with_airflow_rules_is_clean(args: list[str]) -> None:
    ruff = str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_parsing_imports_nothing_heavy() -> None:
    """The DAG file must not pull paramiko, the SSH hooks, aiobotocore or moto in at parse time.

    The operators sit on the Amazon provider's ``AwsBaseOperator``, whose hook class is checked
    when an operator is built, so boto3 and the EC2 hook are imported at parse time, as for every
    provider operator (``benchmarks/orchestration.py`` prints what that costs). The SSH side, the
    async AWS client and the test tools must stay out of the DAG processor. So must jsonschema's
    Lark-based IRI checker, which importing Airflow loads when it is installed: 1.8 CPU-s more for
    every Airflow process (pyproject.toml says why the test extras leave it out; an older venv that has
    it: ``.venv/bin/pip uninstall rfc3987-syntax``).
    """
    heavy = (
        "paramiko", "aiobotocore", "moto", "airflow.providers.ssh.hooks", "operators.hooks.box", "rehearsal",
        "rfc3987_syntax",
    )  # fmt: skip
    code = (
        "import runpy, sys, json; runpy.run_path(sys.argv[1]); heavy = tuple(json.loads(sys.argv[2])); "
        "print(json.dumps(sorted(m for m in sys.modules if m in heavy or m.startswith(heavy))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(DAG_FILE), json.dumps(heavy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_shape_of_the_nightly_dag(dagbag) -> None:
    from operators import defaults

    dag = dagbag.dags["amibake_debian12"]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and "teardown" in dag.doc_md.lower()
    assert set(dag.params.keys()) >= {
        "base_ami", "base_ami_owner", "base_ami_name", "instance_type", "subnet_id",
        "canvas_size_gib", "ami_name_prefix", "mirror_url", "smoke_check", "smoke_instance_type",
    }  # fmt: skip
    chain = ["validate_params", "launch_build_box", "attach_canvas", "remote_chroot_build",
             "frozen_snapshot", "register_hvm_ami", "smoke_instance", "terminate_smoke_instance",
             "terminate_build_box", "delete_canvas"]  # fmt: skip
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert upstream in dag.get_task(downstream).upstream_task_ids, (upstream, downstream)
    # rotation only after the smoke check (which verifies the AMI), never straight after registering
    assert dag.get_task("rotate_amis").upstream_task_ids == {"validate_params", "smoke_instance"}
    assert dag.get_task("launch_build_box").is_setup and dag.get_task("attach_canvas").is_setup
    for teardown in ("terminate_smoke_instance", "terminate_build_box", "delete_canvas"):
        assert dag.get_task(teardown).is_teardown, teardown
    # the smoke instance's teardown runs when the box was launched, whatever the smoke task did
    assert "launch_build_box" in dag.get_task("terminate_smoke_instance").upstream_task_ids
    smoke = dag.get_task("smoke_instance")
    assert not getattr(smoke, "deferrable", False), "the login key must not leave the task: no deferral"
    assert smoke.execution_timeout.total_seconds() > 2 * defaults.SMOKE_CHECK_TIMEOUT_S + (
        defaults.WAIT_INSTANCE_STATUS_OK[0] * defaults.WAIT_INSTANCE_STATUS_OK[1]
    )
    for task in dag.tasks:
        assert task.execution_timeout and task.execution_timeout > timedelta(0), task.task_id
    for task_id in ("launch_build_box", "attach_canvas", "frozen_snapshot", "register_hvm_ami"):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_exponential_backoff, task_id
    waits = {
        "frozen_snapshot": defaults.WAIT_SNAPSHOT_COMPLETED,
        "register_hvm_ami": defaults.WAIT_IMAGE_AVAILABLE,
    }
    for task_id, (delay, attempts) in waits.items():
        assert dag.get_task(task_id).execution_timeout.total_seconds() > delay * attempts
        assert dag.get_task(task_id).deferrable is True


def test_schedule_comes_from_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A definition without its own schedule (the shipped ones) runs at ``[amibake] schedule``."""
    code = (
        "import runpy, sys; g = runpy.run_path(sys.argv[1]); print(g['amibake_centos7'].timetable.expression)"
    )
    env = {**__import__("os").environ, "AIRFLOW__AMIBAKE__SCHEDULE": "17 3 * * *"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(DAG_FILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert out.strip().splitlines()[-1] == "17 3 * * *"
