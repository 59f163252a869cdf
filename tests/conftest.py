"""Shared fixtures: a private Airflow home, moto behind the recording proxy, a real sshd.

The Airflow home must be chosen before Airflow is first imported, so it is set when this file loads
(a unique temp dir per session, removed at the end; other engineers run tests on this machine).
Connections are given as ``AIRFLOW_CONN_*`` JSON and settings as ``AIRFLOW__AMIBAKE__*`` env vars,
exactly as a deployment would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rehearsal.sshd import PACKAGE_CACHE_ENV, package_cache

REPO = Path(__file__).resolve().parents[1]
#: Names the Airflow home this file made, so an xdist worker (which inherits the controller's
#: environment) makes its own instead of sharing the controller's SQLite database.
_OWN_HOME_ENV = "AMIBAKE_TESTS_AIRFLOW_HOME"
_OWN_HOME: str | None = None
if os.environ.get("AIRFLOW_HOME", os.environ.get(_OWN_HOME_ENV)) == os.environ.get(_OWN_HOME_ENV):
    _OWN_HOME = tempfile.mkdtemp(prefix="amibake-test-airflow-")
    os.environ["AIRFLOW_HOME"] = os.environ[_OWN_HOME_ENV] = _OWN_HOME
# Each xdist worker (./run-tests runs two) keeps its own offline package cache: the builds bind it over
# the image's apt archive, and apt refuses to run while another apt holds that dir's lock.
if os.environ.get("PYTEST_XDIST_WORKER") and PACKAGE_CACHE_ENV not in os.environ:
    os.environ[PACKAGE_CACHE_ENV] = str(package_cache() / os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's Airflow home."""
    if _OWN_HOME:
        shutil.rmtree(_OWN_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The metadata DB migrated once per session (``airflow db migrate``)."""
    subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )


@pytest.fixture(scope="session")
def local_ec2() -> Iterator[Any]:
    """One moto server + recording proxy for the session (each test resets it via ``ec2``)."""
    from rehearsal.ec2_local import LocalEc2

    with LocalEc2() as server:
        yield server


@pytest.fixture
def ec2(local_ec2: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty moto with the ``amibake_aws`` connection pointing at the recording proxy."""
    from rehearsal.ec2_local import FAKE_ACCESS_KEY, FAKE_SECRET_KEY

    local_ec2.reset()
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMIBAKE_AWS",
        json.dumps(
            {
                "conn_type": "aws",
                "login": FAKE_ACCESS_KEY,
                "password": FAKE_SECRET_KEY,
                "extra": local_ec2.connection_extra(),
            }
        ),
    )
    return local_ec2


@pytest.fixture(scope="session")
def local_sshd() -> Iterator[Any]:
    """A real OpenSSH server on 127.0.0.1 with throwaway user and host keys.

    Its sessions share the offline package cache, so the suite's Debian builds download once.
    """
    from rehearsal.sshd import LocalSshd, package_cache_env

    with LocalSshd(session_env=package_cache_env(package_cache())) as server:
        yield server


@pytest.fixture
def sshd(local_sshd: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The sshd with ``amibake_ssh`` pointing at it and ``[amibake] ssh_address=connection``."""
    monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_SSH", local_sshd.connection_json())
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_ADDRESS", "connection")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", "127.0.0.1/32")
    return local_sshd


@pytest.fixture
def subnet(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> dict:
    """moto's default subnet, also set as ``[amibake] subnet_id``."""
    found = ec2.boto3_client().describe_subnets()["Subnets"][0]
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SUBNET_ID", found["SubnetId"])
    return found


@pytest.fixture
def nightly(airflow_db: None) -> Any:
    """The nightly DAG as the DAG processor loads it, fresh per test, ready for ``dag.test()``.

    Fresh: ``dag.test(run_conf=...)`` merges the conf into the DAG object's params, so a shared object
    would carry one test's values into the next. Without its deadline alert: Airflow 3.3.2's
    ``dag.test()`` round-trips the DAG through serialization in memory, which leaves deadline alerts as
    dicts where the scheduler has their database ids, and a run that succeeds then crashes in
    ``DagRun.update_state``. The runs under a real scheduler (tests/rehearsal, tests/ui,
    tests/distributed) keep the deadline.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "amibake_nightly.py"))
    assert bag.import_errors == {}
    dag = bag.dags["amibake_nightly"]
    dag.deadline = None
    return dag
