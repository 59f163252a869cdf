"""Shared fixtures: a private Airflow home, the local EC2 API (moto behind the recording proxy) whose
instances are real boxes (``rehearsal.boxes``: an sshd on their own loopback address, a non-root
login with sudo), reached as on AWS with ``[amibake] ssh_address=public_ip``.

The Airflow home must be chosen before Airflow is first imported, so it is set when this file loads
(a unique temp dir per session, removed at the end; other engineers run tests on this machine).
Connections are given as ``AIRFLOW_CONN_*`` JSON and settings as ``AIRFLOW__AMIBAKE__*`` env vars,
exactly as a deployment would.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
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
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_OWN_HOME}/airflow.db"
# Each xdist worker (./run-tests runs two per core) keeps its own offline package cache: the builds
# bind it over the image's apt archive, and apt refuses to run while another apt holds that dir's lock.
if os.environ.get("PYTEST_XDIST_WORKER") and PACKAGE_CACHE_ENV not in os.environ:
    os.environ[PACKAGE_CACHE_ENV] = str(package_cache() / os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
# Every botocore session of a test process shares one data loader, which parses each service model
# once. A new session otherwise parses the EC2 model again (0.3 CPU-s): Airflow's AWS hook makes one
# per hook, and the tests run a few hundred hooks in each worker, where a task process makes one.
# botocore treats loaded models as read-only, as it does for the clients of a single session.
botocore.session.create_loader = functools.lru_cache(maxsize=None)(botocore.session.create_loader)

#: How often ``dag.test()`` looks again when no task is runnable (Airflow's own loop sleeps 1 s).
DAG_TEST_POLL_S = 0.1
_DAG_TEST_FILE = os.path.join("airflow", "sdk", "definitions", "dag.py")
_real_sleep = time.sleep


def _sleep(seconds: float) -> None:
    """``time.sleep``, except that ``DAG.test``'s idle poll waits DAG_TEST_POLL_S instead of 1 s.

    After a task fails, each pass of that loop marks one more level of its downstream
    ``upstream_failed``, and sleeps 1 s between passes: about 3 s of every failing nightly run
    (``pytest -n 0 tests/security/test_hostile_input.py``: 95 s before, 53 s after, the same CPU).
    Triggers run inline there, so no deferred wait is shortened. Matched by the caller's code
    (Airflow imports ``time`` inside ``DAG.test``), so no other sleep changes."""
    caller = sys._getframe(1).f_code
    if seconds == 1 and caller.co_name == "test" and caller.co_filename.endswith(_DAG_TEST_FILE):
        seconds = DAG_TEST_POLL_S
    _real_sleep(seconds)


time.sleep = _sleep


def pytest_configure(config: pytest.Config) -> None:
    """Give the session SIGINT and SIGHUP back if it was started with them ignored (``nohup``, or
    ``&`` in a script): every process the tests start inherits an ignored signal, and bash cannot
    trap one, so the tests that send them to build-image and ./rehearse would wait in vain."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


#: The suite's longest chains, longest first: modules whose tests run one after the other in one
#: worker (an xdist_group, or a module of whole rehearsals). Each is handed to a worker of its own at
#: the start, so none of them starts late and ends the run alone (a longest-first schedule).
LONGEST_FIRST = (
    "tests/e2e/test_green_night.py",  # a build, two boots, then an unchanged and a rebuilt night
    "tests/ui/test_browser.py",  # two whole builds one after the other (max_active_runs=1)
    "tests/scripts/test_debian12.py",  # a build, then boots of broken copies
    "tests/rehearsal/test_rehearse.py",  # a killed rehearsal, the whole next one, a Ctrl-C one
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, the longest chains (LONGEST_FIRST) leading them, then the long ones (a
    stable sort): xdist hands tests out in this order, so the whole builds, and in the edit loop the
    longest tests, start at once on every worker instead of one of them ending the run alone."""

    def rank(item: pytest.Item) -> tuple[bool, int, bool]:
        module = item.nodeid.split("::", 1)[0]
        chain = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
        return item.get_closest_marker("slow") is None, chain, item.get_closest_marker("long") is None

    items.sort(key=rank)


#: The nice value of the longest chain while it runs (LONGEST_FIRST[0]): about three times the CPU share
#: of a process at 0 in the same session. With autogroup (kernel.sched_autogroup_enabled) the cores
#: are shared between sessions first, and the chain's box logins, build phases and guests are sessions
#: of their own, so it weighs little there (measured 2026-12-02; cpu cgroups that did weigh starved the
#: short tests' Airflow and were reverted). Negative values need root, which that chain needs anyway.
LONGEST_CHAIN_NICE = -5


@pytest.fixture(scope="module", autouse=True)
def _longest_chain_ahead(request: pytest.FixtureRequest) -> Iterator[None]:
    """While the module of LONGEST_FIRST[0] runs, every thread of this worker, and so every process
    they start (its boxes, builds and qemu guests), runs at LONGEST_CHAIN_NICE, then at its usual
    value again. On Linux the nice value is per thread, and a new thread or process inherits its
    creator's."""
    if request.node.nodeid.split("::", 1)[0] != LONGEST_FIRST[0] or os.geteuid() != 0:
        yield
        return
    usual = os.getpriority(os.PRIO_PROCESS, 0)
    for tid in _threads():
        os.setpriority(os.PRIO_PROCESS, tid, LONGEST_CHAIN_NICE)
    try:
        yield
    finally:
        for tid in _threads():
            with suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, tid, usual)


def _threads() -> list[int]:
    """The ids of this process's threads."""
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's Airflow home."""
    if _OWN_HOME:
        shutil.rmtree(_OWN_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """The metadata DB migrated once per session, as the rehearsal's Airflow is (``migrate_db``)."""
    from rehearsal.airflow_env import migrate_db

    migrate_db(os.environ)


@pytest.fixture(scope="session")
def local_ec2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local EC2 API (moto + the AWS rules of rehearsal.aws_rules) for the session (each test
    resets it via ``ec2``); every instance launched through it gets a box (rehearsal.boxes), whose
    sessions share the offline package cache (the suite's Debian builds download once), except an
    instance of an AMI whose snapshot the EBS emulator took: that one boots the AMI's bytes
    (rehearsal.guests)."""
    from rehearsal.boxes import Boxes
    from rehearsal.ebs import EbsSnapshots
    from rehearsal.ec2_local import LocalEc2, standard_extensions
    from rehearsal.guests import Guests
    from rehearsal.iam import load_policy
    from rehearsal.sshd import package_cache_env

    snapshots = EbsSnapshots(tmp_path_factory.mktemp("snapshots"))
    boxes = Boxes(session_env=package_cache_env(package_cache()), guests=Guests(snapshots))
    extensions = standard_extensions(policy=load_policy(), snapshots=snapshots, boxes=boxes)
    with LocalEc2(extensions=extensions) as server:
        yield server


@contextmanager
def _ec2_for(local_ec2: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The body of ``ec2``, for a test or (``shared_stack``) for a whole module."""
    from rehearsal.boxes import Boxes
    from rehearsal.ec2_local import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
    from rehearsal.iam import IamEnforcer

    local_ec2.reset()
    iam = IamEnforcer.of(local_ec2)
    iam.clear()
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
    try:
        yield local_ec2
    finally:
        for ext in local_ec2.extensions:
            if isinstance(ext, Boxes):
                for box in ext.boxes:
                    ext.terminate(box.instance_id)
    assert not iam.denials(), iam.report()


@pytest.fixture
def ec2(local_ec2: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An empty moto (no box running) with the ``amibake_aws`` connection pointing at the recording
    proxy. At the end of the test every box is terminated (its processes and mounts end), as the
    next test's reset would, so nothing of it outlives the test. Fails the test if amibake's IAM
    policy (docs/iam-policy.json, enforced by the local EC2 API) refused any request."""
    with _ec2_for(local_ec2, monkeypatch) as server:
        yield server


@pytest.fixture
def boxes(ec2: Any) -> Any:
    """The local EC2 API's boxes (``rehearsal.boxes.Boxes``): look one up by instance id."""
    return _boxes_of(ec2)


def _boxes_of(ec2: Any) -> Any:
    from rehearsal.boxes import Boxes

    return next(ext for ext in ec2.extensions if isinstance(ext, Boxes))


@pytest.fixture(scope="session")
def login_key() -> Any:
    """The SSH connection's throwaway key, for the base AMI's default user (``amibake-test-base``)."""
    from rehearsal.boxes import Login, default_user

    return Login.new(default_user("amibake-test-base"))


@pytest.fixture
def box_login(login_key: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``amibake_ssh`` = login + private key only, reached as on AWS: ``[amibake] ssh_address=public_ip``
    with tcp/22 admitted from ``ssh_cidr=127.0.0.0/8`` (where every box's address lies)."""
    return _login_as(login_key, monkeypatch)


def _login_as(login_key: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from rehearsal.boxes import BOX_NETWORK

    monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_SSH", json.dumps(login_key.connection()))
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_ADDRESS", "public_ip")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__SSH_CIDR", BOX_NETWORK)
    return login_key


@pytest.fixture
def launched_box(ec2: Any, boxes: Any, box_login: Any) -> tuple[dict[str, Any], Any]:
    """One build box launched with the product's user data (tagged as a build's box), without the
    operators: ``LaunchBuildBox``'s XCom (``operators.rules.records.Box``) for it, and its
    :class:`rehearsal.boxes.Box`. The recorded requests are cleared afterwards."""
    import io

    import paramiko

    from operators.rules import naming
    from operators.rules.launch import new_host_key, user_data

    key = paramiko.Ed25519Key.from_private_key(io.StringIO(box_login.private_key_pem))
    host_key = new_host_key()
    tags = naming.resource_tags(
        build="0123456789ab", dag_id="amibake_t_box", run_id="manual__t", recipe="debian12",
        role=naming.Role.BUILD_BOX,
    )  # fmt: skip
    run = ec2.boto3_client(recorded=True).run_instances(
        ImageId=ec2.register_base_image("amibake-test-base"),
        MinCount=1,
        MaxCount=1,
        UserData=user_data(f"{key.get_name()} {key.get_base64()} amibake", host_key),
        TagSpecifications=[
            naming.tag_specification(kind, tags) for kind in ("instance", "volume", "network-interface")
        ],
    )
    instance_id = run["Instances"][0]["InstanceId"]
    box = boxes.get(instance_id)
    ec2.clear_requests()
    instance = run["Instances"][0]
    xcom = {
        "build_id": "0123456789ab",
        "instance_id": instance_id,
        "security_group_id": instance["SecurityGroups"][0]["GroupId"] if instance["SecurityGroups"] else "",
        "availability_zone": instance["Placement"]["AvailabilityZone"],
        "ssh_address": "public_ip",
        "address": box.address,
        "port": 22,
        "host_key": host_key[1],
    }
    return xcom, box


@pytest.fixture
def subnet(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> dict:
    """moto's default subnet, also set as ``[amibake] subnet_id``."""
    return _default_subnet(ec2, monkeypatch)


def _default_subnet(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> dict:
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
    return _load_nightly()


def _load_nightly() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "amibake_images.py"))
    assert bag.import_errors == {}
    dag = bag.dags["amibake_debian12"]
    dag.deadline = None
    return dag


@dataclass(frozen=True)
class Stack:
    """What ``ec2``, ``boxes``, ``box_login``, ``subnet`` and ``nightly`` give a test, plus the
    monkeypatch that set it up (undone when the stack ends)."""

    ec2: Any
    boxes: Any
    login: Any
    subnet: dict
    nightly: Any
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture(scope="module")
def shared_stack(local_ec2: Any, login_key: Any, airflow_db: None) -> Iterator[Stack]:
    """``ec2`` + ``boxes`` + ``box_login`` + ``subnet`` + ``nightly`` once for a whole module, set up
    and checked (boxes terminated, no IAM denial) exactly as those fixtures do per test: for a module
    whose tests all read the results of one expensive run (tests/e2e). Such a module must run in one
    xdist worker (``pytest.mark.xdist_group``) with no other test of that worker in between."""
    with pytest.MonkeyPatch.context() as monkeypatch, _ec2_for(local_ec2, monkeypatch) as server:
        yield Stack(
            ec2=server,
            boxes=_boxes_of(server),
            login=_login_as(login_key, monkeypatch),
            subnet=_default_subnet(server, monkeypatch),
            nightly=_load_nightly(),
            monkeypatch=monkeypatch,
        )
