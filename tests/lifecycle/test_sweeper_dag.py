"""The amibake_sweeper DAG file: parses cleanly, without heavy imports, with the promised settings."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "amibake_sweeper.py"


@pytest.fixture(scope="module")
def dag() -> object:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    [stat] = bag.dagbag_stats
    print(f"amibake_sweeper.py parse: {stat.duration.total_seconds():.3f} s")  # a figure, not a check
    return bag.dags["amibake_sweeper"]


def test_schedule_and_run_settings(dag: object) -> None:
    assert dag.schedule == "@hourly"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert "dry_run" in dag.doc_md and "max_age_hours" in dag.doc_md
    [task] = dag.tasks
    assert type(task).__name__ == "SweepOrphans"
    assert task.dry_run == "{{ params.dry_run }}" and task.max_age_hours == "{{ params.max_age_hours }}"


def test_params_default_to_acting_and_refuse_bad_values_in_the_form(dag: object) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    assert dag.params.validate() == {"dry_run": False, "max_age_hours": 6}
    for bad in ({"max_age_hours": 0}, {"max_age_hours": "6"}, {"dry_run": "yes"}, {"max_age_hours": 10**6}):
        params = copy.deepcopy(dag.params)
        with pytest.raises(ParamValidationError, match=next(iter(bad))):
            params.update(bad)


def test_parsing_imports_no_test_tools_or_ssh() -> None:
    """The sweeper sits on the provider's AwsBaseOperator (boto3 is imported at parse time, as for
    every provider operator); moto, the SSH side and the async AWS client must stay out."""
    code = (
        "import json, runpy, sys; runpy.run_path(sys.argv[1]);"
        "print(json.dumps([m for m in ('moto', 'paramiko', 'aiobotocore', 'rehearsal') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(DAG_FILE)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
