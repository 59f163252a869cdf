"""AttachCanvas / DeleteCanvas / RegisterHVMAmi against moto behind the recorder."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk import DAG, Asset, AssetAlias
from operator_harness import make_context, run_operator

from operators import defaults
from operators.ami import RegisterHVMAmi
from operators.build_box import LaunchBuildBox
from operators.canvas import AttachCanvas, DeleteCanvas
from operators.rules import naming
from operators.rules.validation import ParamError
from rehearsal.ec2_local import tag_specs

RUN_ID = "scheduled__2026-11-25T02:00:00+00:00"


@pytest.fixture
def box(ec2: Any, box_login: Any, subnet: dict) -> tuple[DAG, dict]:
    """A launched build box (through the real operator) in a fresh DAG."""
    ami = ec2.register_base_image("amibake-test-base")
    with DAG("amibake_t_canvas", schedule=None) as dag:
        launch = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", base_ami=ami)
    result = run_operator(launch, make_context(dag, RUN_ID)).result
    ec2.clear_requests()
    return dag, result


def _attach(dag: DAG, box: dict, **kwargs: Any) -> AttachCanvas:
    with dag:
        return AttachCanvas(task_id=f"attach_canvas_{len(dag.tasks)}", recipe="debian12", box=box, **kwargs)


def test_attach_canvas_requests_and_retry(ec2: Any, box: tuple[DAG, dict]) -> None:
    dag, result = box
    op = _attach(dag, result, size_gib=6, kms_key_id="alias/amibake-test")
    canvas = run_operator(op, make_context(dag, RUN_ID, max_tries=2)).result
    build = naming.build_id(dag.dag_id, RUN_ID)

    (create,) = ec2.calls("CreateVolume")
    assert create["AvailabilityZone"] == result["availability_zone"]
    assert create["Size"] == "6"
    assert create["VolumeType"] == "gp3"
    assert create["Encrypted"] == "true"
    assert create["KmsKeyId"] == "alias/amibake-test"
    assert create["ClientToken"] == f"amibake-{build}-canvas-1"
    tags = tag_specs(create)["volume"]
    assert (tags[naming.TAG_BUILD_ID], tags[naming.TAG_ROLE], tags[naming.TAG_RECIPE]) == (
        build,
        "canvas",
        "debian12",
    )
    (attach,) = ec2.calls("AttachVolume")
    assert attach == {
        "VolumeId": canvas["volume_id"],
        "InstanceId": result["instance_id"],
        "Device": "/dev/sdf",
    }
    assert canvas == {"volume_id": canvas["volume_id"], "device_name": "/dev/sdf", "size_gib": 6}

    again = run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=2)).result
    assert again == canvas
    assert len(ec2.calls("CreateVolume")) == 1 and len(ec2.calls("AttachVolume")) == 1


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("size_gib", {"size_gib": 0}),
        ("device_name", {"device_name": "/dev/sda1"}),
        ("kms_key_id", {"kms_key_id": "alias/x", "encrypted": False}),
        ("encrypted", {"encrypted": "perhaps"}),
    ],
)
def test_attach_canvas_refuses_bad_input_before_creating(
    ec2: Any, box: tuple[DAG, dict], field: str, kwargs: dict
) -> None:
    dag, result = box
    with pytest.raises(ParamError, match=f"^{field}: "):
        run_operator(_attach(dag, result, **kwargs), make_context(dag, RUN_ID))
    assert ec2.requests == []


def test_attach_failure_deletes_the_volume_on_the_last_try(ec2: Any, box: tuple[DAG, dict]) -> None:
    dag, result = box
    ec2.add_fault("AttachVolume", "IncorrectState", 400, times=1)
    with pytest.raises(Exception, match="IncorrectState"):
        run_operator(_attach(dag, result), make_context(dag, RUN_ID, try_number=1, max_tries=0))
    (created,) = ec2.calls("CreateVolume")
    assert len(ec2.calls("DeleteVolume")) == 1
    left = ec2.boto3_client().describe_volumes(Filters=naming.project_filters(naming.Role.CANVAS))["Volumes"]
    assert left == []


def test_delete_canvas_detaches_naming_the_instance(ec2: Any, box: tuple[DAG, dict]) -> None:
    dag, result = box
    canvas = run_operator(_attach(dag, result), make_context(dag, RUN_ID)).result
    with dag:
        teardown = DeleteCanvas(task_id="delete_canvas")
    ec2.clear_requests()
    assert run_operator(teardown, make_context(dag, RUN_ID)).result == {"deleted": [canvas["volume_id"]]}
    (detach,) = ec2.calls("DetachVolume")
    assert detach["VolumeId"] == canvas["volume_id"] and detach["InstanceId"] == result["instance_id"]
    assert ec2.calls("DeleteVolume")[0]["VolumeId"] == canvas["volume_id"]
    assert run_operator(teardown, make_context(dag, RUN_ID)).result == {"deleted": []}


def _register(dag_id: str, snapshot_id: str, **kwargs: Any) -> tuple[DAG, RegisterHVMAmi]:
    with DAG(dag_id, schedule=None) as dag:
        op = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe="centos7",
            snapshot={"snapshot_id": snapshot_id, "volume_id": "vol-0123456789abcdef0"},
            size_gib=8,
            **kwargs,
        )
    return dag, op


def _completed_snapshot(ec2: Any) -> str:
    """An 8 GiB completed snapshot (the local EC2 API registers AMIs only from real ones), tagged as
    FrozenSnapshot tags its own (the IAM policy lets amibake register AMIs only from its snapshots)."""
    moto = ec2.boto3_client()
    volume = moto.create_volume(AvailabilityZone=f"{ec2.region}a", Size=8)["VolumeId"]
    ours = naming.tag_specification("snapshot", [{"Key": naming.TAG_BUILD_ID, "Value": "0123456789ab"}])
    return moto.create_snapshot(VolumeId=volume, TagSpecifications=[ours])["SnapshotId"]


def test_register_sends_every_parameter_and_emits_the_asset(ec2: Any) -> None:
    snap = _completed_snapshot(ec2)
    dag, op = _register("amibake_t_register", snap, ami_name_prefix="golden-el7")
    context = make_context(dag, RUN_ID, run_after=datetime(2026, 11, 25, 2, 3, tzinfo=UTC))
    record = run_operator(op, context)
    build = naming.build_id(dag.dag_id, RUN_ID)
    name = f"golden-el7-20261125-0203-{build}"

    # available at once here, so never deferred: a trigger firing within a second of defer() races
    # the scheduler (apache/airflow#66374); test_snapshot covers the deferred wait
    assert record.deferrals == []
    (reg,) = ec2.calls("RegisterImage")
    tags = tag_specs(reg).pop("image")
    assert tags[naming.TAG_RECIPE] == "centos7"
    assert tags[naming.TAG_RUN_ID] == RUN_ID
    assert tags[naming.TAG_SNAPSHOT_ID] == snap
    assert tags[naming.TAG_ROLE] == "ami"
    assert {k: v for k, v in reg.items() if not k.startswith("TagSpecification.")} == {
        "Name": name,
        "Description": f"amibake centos7 image, build {build}, run {RUN_ID}",
        "Architecture": "x86_64",
        "VirtualizationType": "hvm",
        "RootDeviceName": "/dev/sda1",
        "BlockDeviceMapping.1.DeviceName": "/dev/sda1",
        "BlockDeviceMapping.1.Ebs.SnapshotId": snap,
        "BlockDeviceMapping.1.Ebs.VolumeSize": "8",
        "BlockDeviceMapping.1.Ebs.VolumeType": "gp3",
        "BlockDeviceMapping.1.Ebs.DeleteOnTermination": "true",
        "EnaSupport": "true",
        "SriovNetSupport": "simple",
        "BootMode": "legacy-bios",
        "ImdsSupport": "v2.0",
    }
    ami_id = record.result["ami_id"]
    assert record.result == {"ami_id": ami_id, "ami_name": name, "snapshot_id": snap}
    # tagged at creation: the local EC2 API keeps RegisterImage's tags, as AWS does
    assert ec2.calls("CreateTags") == []
    described = ec2.boto3_client().describe_images(ImageIds=[ami_id])["Images"][0]
    assert naming.tags_to_dict(described["Tags"])[naming.TAG_BUILD_ID] == build

    events = context["outlet_events"][AssetAlias(defaults.ASSET_ALIAS)].asset_alias_events
    (event,) = events
    assert event.dest_asset_key.uri == Asset(uri="amibake://ami/centos7").uri
    assert event.extra == {**record.result, "recipe": "centos7", "image": "centos7", "region": ec2.region}
    assert op.outlets == [AssetAlias(defaults.ASSET_ALIAS)]
    assert context["ti"].pushed["_amibake_ami"]["image_id"] == ami_id


def test_register_retry_reuses_the_ami(ec2: Any) -> None:
    dag, op = _register("amibake_t_register_retry", _completed_snapshot(ec2))
    first = run_operator(op, make_context(dag, RUN_ID, max_tries=1)).result
    second = run_operator(op, make_context(dag, RUN_ID, try_number=2, max_tries=1)).result
    assert first == second
    assert len(ec2.calls("RegisterImage")) == 1


def test_register_refuses_bad_input_before_creating(ec2: Any) -> None:
    dag, op = _register("amibake_t_register_bad", "snap-0123456789abcdef0", ami_name_prefix="no*stars")
    with pytest.raises(ParamError, match="^ami_name_prefix: "):
        run_operator(op, make_context(dag, RUN_ID))
    dag, op = _register("amibake_t_register_bad2", "snapshot-1")
    with pytest.raises(ParamError, match="^snapshot.snapshot_id: "):
        run_operator(op, make_context(dag, RUN_ID))
    assert ec2.requests == []


def test_register_refuses_to_reuse_an_ami_of_another_snapshot(ec2: Any) -> None:
    dag, op = _register("amibake_t_register_other", _completed_snapshot(ec2))
    run_operator(op, make_context(dag, RUN_ID, max_tries=1))
    with dag:
        again = RegisterHVMAmi(
            task_id="register_hvm_ami_again",
            recipe="centos7",
            snapshot={"snapshot_id": "snap-0fedcba9876543210", "volume_id": "vol-0123456789abcdef0"},
            size_gib=8,
        )
    with pytest.raises(Exception, match="registered from another snapshot"):
        run_operator(again, make_context(dag, RUN_ID, try_number=2, max_tries=1))
    assert len(ec2.calls("RegisterImage")) == 1
