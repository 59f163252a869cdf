"""The sweeper DAG against moto behind the recording proxy: what it removes, in which order, and
what it must never touch. Runs the real ``dags/amibake_sweeper.py`` with ``dag.test()``, so the
"is the build's DAG run still running?" question goes through the real Task SDK to the metadata DB.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lifecycle_helpers import (
    NOW,
    OLD,
    YOUNG,
    all_ids,
    ids,
    make_ami,
    make_build,
    make_snapshot,
    mutating,
    set_instance_state,
)

from operators.rules.validation import ParamError

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "amibake_sweeper.py"


@pytest.fixture
def run_after() -> datetime:
    """A fresh run_after per test, so each dag.test() run gets its own run id."""
    return datetime.now(UTC)


def run_id_of(run_after: datetime) -> str:
    """The run id dag.test() gives a run; a build tagged with it belongs to a running DAG run."""
    return f"manual__{run_after.isoformat()}"


def run_sweeper(run_after: datetime, **conf: Any) -> tuple[Any, Any]:
    """Run the sweeper DAG once in-process; return (dag run, the task's XCom)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.get_dag("amibake_sweeper").test(run_after=run_after, run_conf=conf)
    assert dag_run.run_id == run_id_of(run_after)
    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id, dag_ids="amibake_sweeper", task_ids="sweep_orphans", key="return_value"
            )
        ).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    return dag_run, value


@pytest.fixture
def world(ec2: Any, airflow_db: None, run_after: datetime) -> dict[str, Any]:
    """Resources of five kinds of builds, plus lookalikes without our build-id tag."""
    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000a1", OLD, base)
    old["failed_ami_snapshot"] = make_snapshot(ec2, "0000000000a1", OLD)
    old["failed_ami"] = make_ami(
        ec2, "0000000000a1", OLD, snapshot=old["failed_ami_snapshot"], state="failed"
    )
    old["loose_snapshot"] = make_snapshot(ec2, "0000000000a1", OLD)
    # a canvas still attached to a box that is already shutting down: must be detached, naming it
    stuck = make_build(ec2, "0000000000a2", OLD, base)
    set_instance_state(ec2, stuck["instance"], "shutting-down")
    young = make_build(ec2, "0000000000b1", YOUNG, base)
    active = make_build(ec2, "0000000000c1", OLD, base, dag_id="amibake_sweeper", run_id=run_id_of(run_after))
    kept = {"snapshot": make_snapshot(ec2, "0000000000d1", OLD)}
    kept["ami"] = make_ami(ec2, "0000000000d1", OLD, snapshot=kept["snapshot"])
    foreign = make_build(ec2, None, OLD, base)
    foreign["snapshot2"] = make_snapshot(ec2, None, OLD)
    foreign["failed_ami"] = make_ami(ec2, None, OLD, state="failed")
    ec2.clear_requests()
    return {"old": old, "stuck": stuck, "young": young, "active": active, "kept": kept, "foreign": foreign}


def test_sweeps_old_orphans_in_order_and_nothing_else(
    ec2: Any, world: dict[str, Any], run_after: datetime
) -> None:
    dag_run, xcom = run_sweeper(run_after, max_age_hours=6)
    assert dag_run.state == "success"
    calls = mutating(ec2)
    old, stuck = world["old"], world["stuck"]

    assert ids(calls, "TerminateInstances") == [old["instance"]]
    assert ids(calls, "DetachVolume") == [stuck["instance"], stuck["volume"]]  # InstanceId always sent
    assert sorted(ids(calls, "DeleteVolume")) == sorted([old["volume"], stuck["volume"]])
    # a group is asked again while its terminated box's interface lingers (as on AWS): once or more
    assert set(ids(calls, "DeleteSecurityGroup")) == {old["sg"], stuck["sg"]}
    assert ids(calls, "DeregisterImage") == [old["failed_ami"]]
    assert sorted(ids(calls, "DeleteSnapshot")) == sorted(
        [old["snapshot"], old["failed_ami_snapshot"], old["loose_snapshot"], stuck["snapshot"]]
    )
    order = [c["action"] for c in calls]
    firsts = [order.index(a) for a in ("TerminateInstances", "DeleteVolume", "DeleteSecurityGroup")]
    lasts = [order.index(a) for a in ("DeregisterImage", "DeleteSnapshot")]
    assert firsts == sorted(firsts) and max(firsts) < min(lasts) and lasts == sorted(lasts)

    untouchable = {v for k in ("young", "active", "kept", "foreign") for v in world[k].values()}
    assert not all_ids(calls) & untouchable

    swept = {(a["kind"], a["id"]) for a in xcom}
    assert ("instance", old["instance"]) in swept and ("image", old["failed_ami"]) in swept
    assert len(xcom) == 1 + 2 + 2 + 1 + 4 and all(a["reason"] for a in xcom)

    ec2c = ec2.boto3_client()
    live = {v["VolumeId"] for v in ec2c.describe_volumes()["Volumes"] if v["State"] != "deleting"} | {
        s["SnapshotId"] for s in ec2c.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    }
    assert {world["young"]["volume"], world["active"]["snapshot"], world["kept"]["snapshot"]} <= live
    assert {world["foreign"]["volume"], world["foreign"]["snapshot"], world["foreign"]["snapshot2"]} <= live
    assert not {old["volume"], old["snapshot"], old["loose_snapshot"], stuck["volume"]} & live
    images = {i["ImageId"] for i in ec2c.describe_images(Owners=["self"])["Images"]}
    assert world["kept"]["ami"] in images and world["foreign"]["failed_ami"] in images
    assert old["failed_ami"] not in images


def test_dry_run_lists_the_same_and_changes_nothing(
    ec2: Any, world: dict[str, Any], run_after: datetime
) -> None:
    dag_run, xcom = run_sweeper(run_after, dry_run=True, max_age_hours=6)
    assert dag_run.state == "success"
    assert mutating(ec2) == []
    assert {a["id"] for a in xcom} == {
        *[world["old"][k] for k in ("instance", "volume", "sg", "snapshot", "failed_ami")],
        world["old"]["failed_ami_snapshot"],
        world["old"]["loose_snapshot"],
        *[world["stuck"][k] for k in ("volume", "sg", "snapshot")],
    }


def test_a_larger_age_spares_everything(ec2: Any, world: dict[str, Any], run_after: datetime) -> None:
    hours = (NOW - OLD).total_seconds() / 3600 + 1
    dag_run, xcom = run_sweeper(run_after, max_age_hours=hours)
    assert dag_run.state == "success" and xcom == [] and mutating(ec2) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_age_hours", "six"),
        ("max_age_hours", "6; rm -rf /"),
        ("max_age_hours", "$(reboot)"),
        ("max_age_hours", 0),
        ("max_age_hours", -6),
        ("max_age_hours", "nan"),
        ("max_age_hours", 10**9),
        ("max_age_hours", True),
        ("max_age_hours", None),
        ("max_age_hours", [6]),
        ("dry_run", "yes"),
        ("dry_run", 1),
        ("dry_run", None),
        ("dry_run", "true\nfalse"),
    ],
)
def test_bad_input_is_refused_naming_the_field_before_any_call(ec2: Any, field: str, value: Any) -> None:
    from operators.sweep import SweepOrphans

    op = SweepOrphans(task_id="sweep", **{field: value})
    with pytest.raises(ParamError, match=f"^{field}: ") as err:
        op.execute({})
    assert err.value.field == field
    assert ec2.requests == []


def test_one_failed_removal_does_not_stop_the_others(ec2: Any) -> None:
    """A build with no dag/run tags (age alone decides); DeleteSecurityGroup is refused by AWS."""
    from operators.sweep import SweepOrphans

    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000e1", OLD, base, dag_id="", run_id="")
    ec2.clear_requests()
    ec2.add_fault("DeleteSecurityGroup", "UnauthorizedOperation", 403, times=None)
    with pytest.raises(RuntimeError, match=f"could not remove: security-group {old['sg']}"):
        SweepOrphans(task_id="sweep", max_age_hours="6").execute({})
    calls = mutating(ec2)
    assert ids(calls, "TerminateInstances") == [old["instance"]]
    assert ids(calls, "DeleteVolume") == [old["volume"]]
    assert ids(calls, "DeleteSnapshot") == [old["snapshot"]]
    assert ids(calls, "DeleteSecurityGroup") == [old["sg"]]  # tried once: not a retryable error


def test_a_box_that_cannot_be_terminated_keeps_its_volume_and_group_for_later(ec2: Any) -> None:
    from operators.sweep import SweepOrphans

    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000e2", OLD, base, dag_id="", run_id="")
    ec2.clear_requests()
    ec2.add_fault("TerminateInstances", "UnauthorizedOperation", 403, times=None)
    with pytest.raises(RuntimeError, match=f"could not remove: instance {old['instance']}"):
        SweepOrphans(task_id="sweep", max_age_hours=6).execute({})
    actions = [c["action"] for c in mutating(ec2)]
    assert actions == ["TerminateInstances", "DeleteSnapshot"]
    assert ids(mutating(ec2), "DeleteSnapshot") == [old["snapshot"]]


def test_an_already_gone_resource_counts_as_removed(ec2: Any) -> None:
    """TerminateInstances answers NotFound (the box went away meanwhile): the sweep goes on and succeeds.

    The fault is injected after moto acted, so the box really is gone, as in the race it stands for."""
    from operators.sweep import SweepOrphans

    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000e3", OLD, base, dag_id="", run_id="")
    ec2.clear_requests()
    ec2.add_fault("TerminateInstances", "InvalidInstanceID.NotFound", 400, times=1, when="after")
    result = SweepOrphans(task_id="sweep", max_age_hours=6).execute({})
    assert {a["id"] for a in result} == {old["instance"], old["volume"], old["sg"], old["snapshot"]}
    calls = mutating(ec2)
    assert ids(calls, "DeleteVolume") == [old["volume"]]
    assert set(ids(calls, "DeleteSecurityGroup")) == {old["sg"]}  # retried while its interface lingers


def test_throttling_is_retried_without_a_second_removal(ec2: Any) -> None:
    """RequestLimitExceeded (503) twice on a read and on each kind of removal: botocore retries."""
    from operators.sweep import SweepOrphans

    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000e4", OLD, base, dag_id="", run_id="")
    ec2.clear_requests()
    for action in ("DescribeVolumes", "TerminateInstances", "DeleteVolume", "DeleteSnapshot"):
        ec2.add_fault(action, "RequestLimitExceeded", 503, times=2)
    result = SweepOrphans(task_id="sweep", max_age_hours=6).execute({})
    assert {a["id"] for a in result} == {old["instance"], old["volume"], old["sg"], old["snapshot"]}
    calls = mutating(ec2)
    assert ids(calls, "TerminateInstances") == [old["instance"]] * 3
    assert ids(calls, "DeleteVolume") == [old["volume"]] * 3
    assert ids(calls, "DeleteSnapshot") == [old["snapshot"]] * 3
    assert [c.get("fault") for c in ec2.requests if c["action"] == "DeleteVolume"] == [
        "RequestLimitExceeded",
        "RequestLimitExceeded",
        None,
    ]


def test_a_lasting_outage_fails_the_sweep_and_the_next_sweep_finishes(ec2: Any) -> None:
    """DeleteVolume answers HTTP 500 on every try: retried, reported, the rest still removed;
    once AWS recovers, the next hourly sweep removes the volume, and only it."""
    from operators.sweep import SweepOrphans

    base = ec2.register_base_image("base-el7")
    old = make_build(ec2, "0000000000e5", OLD, base, dag_id="", run_id="")
    ec2.clear_requests()
    ec2.add_fault("DeleteVolume", "InternalError", 500, times=None)
    with pytest.raises(RuntimeError, match=f"could not remove: volume {old['volume']}"):
        SweepOrphans(task_id="sweep", max_age_hours=6).execute({})
    calls = mutating(ec2)
    assert len(ids(calls, "DeleteVolume")) > 1 and set(ids(calls, "DeleteVolume")) == {old["volume"]}
    assert ids(calls, "DeleteSecurityGroup") == [old["sg"]] and ids(calls, "DeleteSnapshot") == [
        old["snapshot"]
    ]

    ec2.clear_faults()
    ec2.clear_requests()
    result = SweepOrphans(task_id="sweep", max_age_hours=6).execute({})
    assert [a["id"] for a in result] == [old["volume"]]
    assert [(c["action"], *ids([c], c["action"])) for c in mutating(ec2)] == [("DeleteVolume", old["volume"])]
