"""The test runner itself: ./run-tests relies on ``--dist loadgroup`` to build each green night and
Debian image once. pytest 9.2 with pytest-xdist 3.8 silently stopped grouping
(pytest-dev/pytest-xdist#1386): every test of a group then set up its own copy of the module's
expensive fixture, in both workers. This runs a tiny suite the way ./run-tests does and checks that a
group's tests share one worker and one fixture set-up. It also checks the root conftest's ordering of
the slow tests and its repair of signals a session inherits ignored."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.fixture(scope="module")
def expensive():
    with open(os.environ["SETUPS"], "a") as f:
        f.write(f"setup {os.getpid()}\\n")
    yield


@pytest.mark.parametrize("i", range(6))
def test_grouped(expensive, i):
    with open(os.environ["SETUPS"], "a") as f:
        f.write(f"run {os.getpid()}\\n")
"""
UNGROUPED = """
import pytest


@pytest.mark.parametrize("i", range(12))
def test_free(i):
    pass
"""


def test_loadgroup_runs_a_group_in_one_worker_with_one_setup(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(UNGROUPED)
    setups = tmp_path / "setups"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "SETUPS": str(setups)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = setups.read_text().splitlines()
    assert [line for line in lines if line.startswith("setup")] == [lines[0]], lines
    assert {line.split()[1] for line in lines} == {lines[0].split()[1]}, (
        f"the group ran in two workers: {lines}"
    )


class _Item:
    """What the ordering hook reads of a collected test: its node id and markers."""

    def __init__(self, name: str, *markers: str, module: str = "tests/test_x.py") -> None:
        self.name, self.markers = name, markers
        self.nodeid = f"{module}::{name}"

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.markers else None


def _root_conftest(config: pytest.Config) -> Any:
    """The root conftest module (``import conftest`` may find another one in a whole run)."""
    (root_conftest,) = [
        plugin
        for plugin in config.pluginmanager.get_plugins()
        if getattr(plugin, "__file__", None) == str(Path(__file__).with_name("conftest.py"))
    ]
    return root_conftest


def test_slow_then_long_tests_are_handed_out_first_in_collection_order(pytestconfig: pytest.Config) -> None:
    root_conftest = _root_conftest(pytestconfig)
    items = [_Item("a"), _Item("b", "long"), _Item("c", "slow"), _Item("d"), _Item("e", "long", "root"),
             _Item("f", "slow", "long")]
    root_conftest.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == ["f", "c", "b", "e", "a", "d"]


def test_the_longest_chains_lead_the_slow_tests_longest_first(pytestconfig: pytest.Config) -> None:
    """Each chain of LONGEST_FIRST is a slow module that exists; they are handed out first, in that
    order, each module's tests kept in their own order."""
    root_conftest = _root_conftest(pytestconfig)
    chains = root_conftest.LONGEST_FIRST
    assert all((REPO / module).is_file() for module in chains), chains
    items = [_Item("fast", "long"), _Item("slow", "slow"),
             *(_Item(f"{i}{n}", "slow", module=module) for i, module in reversed(list(enumerate(chains)))
               for n in "ab")]
    root_conftest.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == [f"{i}{n}" for i in range(len(chains)) for n in "ab"] + ["slow", "fast"]


def test_a_session_started_with_int_and_hup_ignored_gives_its_children_both_back(
    pytestconfig: pytest.Config,
) -> None:
    """Under ``nohup ... &`` SIGHUP and SIGINT arrive ignored, and a child bash cannot trap them."""
    trap = ["bash", "-c", 'trap "exit 7" HUP INT; kill -"$0" $$; exit 0']
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)
        assert subprocess.run([*trap, "HUP"], check=False).returncode == 0  # what the tests met
        _root_conftest(pytestconfig).pytest_configure(pytestconfig)
        assert [subprocess.run([*trap, name], check=False).returncode for name in ("HUP", "INT")] == [7, 7]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_sessions_of_a_test_process_parse_each_service_model_once() -> None:
    """The root conftest shares botocore's data loader, so a new session costs no new parse."""
    first, second = (boto3.session.Session(region_name="us-east-1") for _ in range(2))
    assert first._loader is second._loader
    model = first._loader.load_service_model("ec2", "service-2")
    assert second._loader.load_service_model("ec2", "service-2") is model


def test_only_dag_tests_idle_poll_is_shortened(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root conftest's ``time.sleep`` waits DAG_TEST_POLL_S where ``DAG.test`` sleeps 1 s when no
    task is runnable, and the asked time everywhere else; and Airflow's loop still has that sleep."""
    from airflow.sdk import DAG

    conftest = time.sleep.__globals__  # the root conftest's (every conftest module is named "conftest")
    dag_py = conftest["_DAG_TEST_FILE"]
    assert "time.sleep(1)" in inspect.getsource(DAG.test) and DAG.test.__code__.co_filename.endswith(dag_py)
    slept: list[float] = []
    monkeypatch.setitem(conftest, "_real_sleep", slept.append)
    in_dag_test: dict[str, Any] = {"time": time}
    loop = compile("def test():\n    time.sleep(1)\n", os.path.join("site", dag_py), "exec")
    exec(loop, in_dag_test)  # a function named test in a file named as Airflow's dag.py
    in_dag_test["test"]()
    time.sleep(1)
    time.sleep(0.5)
    assert slept == [conftest["DAG_TEST_POLL_S"], 1, 0.5]
