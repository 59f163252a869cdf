"""PublishManifest against the local EC2 API (moto behind the recording proxy, IAM policy enforced) and
moto's S3 (the same server, through the same ``amibake_aws`` connection and the Amazon provider's
S3Hook): tags on the AMI, packages.json and sbom.cdx.json in the bucket, and what changed since the
previous AMI of the line, read from its S3 folder, or without a bucket from the XCom of the run that
built it (a real Airflow run through ``dag.test``, the metadata DB, the Task SDK's xcom_pull)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from dag_runs import xcom_of
from operator_harness import make_context, run_operator

from operators import defaults
from operators.ami import RegisterHVMAmi
from operators.manifest import BUILD_TASK_ID, PublishManifest, scripts_commit
from operators.rules import definition, lifecycle, manifest, naming
from operators.rules.manifest import Package
from operators.rules.naming import Role

BUCKET = "amibake-manifests-test"
EXPECTATIONS = {"login_user": "admin", "cmdline": "root=UUID=0", "baked_host_keys": [],
                "require_selinux": False, "checks": []}  # fmt: skip
#: Last night's image and tonight's: one package updated, one added, one removed.
OLD = [
    Package("base-files", 0, "12.4+deb12u10", "", "amd64"),
    Package("bash", 0, "5.2.15", "2+b7", "amd64"),
    Package("libc6", 0, "2.36", "9+deb12u13", "amd64"),
    Package("nano", 0, "7.2", "1+deb12u1", "amd64"),
]
NEW = [
    Package("base-files", 0, "12.4+deb12u10", "", "amd64"),
    Package("bash", 0, "5.2.15", "2+b7", "amd64"),
    Package("cloud-init", 0, "22.4.2", "1+deb12u3", "all"),
    Package("libc6", 0, "2.36", "9+deb12u14", "amd64"),
]
T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def _build(packages: list[Package]) -> dict[str, Any]:
    return {"volume_id": "vol-0123456789abcdef0", "expectations": EXPECTATIONS,
            "packages": manifest.to_records(packages)}  # fmt: skip


def _register(ec2: Any, dag_id: str, run_id: str, run_after: datetime) -> dict[str, str]:
    """An AMI registered by RegisterHVMAmi (from a tagged snapshot) for run ``run_id`` of ``dag_id``."""
    moto = ec2.boto3_client()
    build = naming.build_id(dag_id, run_id)
    volume = moto.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    tags = naming.resource_tags(
        build=build, dag_id=dag_id, run_id=run_id, recipe="debian12", role=Role.SNAPSHOT
    )
    snapshot = moto.create_snapshot(
        VolumeId=volume, TagSpecifications=[naming.tag_specification("snapshot", tags)]
    )["SnapshotId"]
    moto.delete_volume(VolumeId=volume)
    with DAG(dag_id, schedule=None) as dag:
        register = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe="debian12",
            image="debian12",
            snapshot={"snapshot_id": snapshot, "volume_id": volume},
            size_gib=2,
            deferrable=False,
        )
    return run_operator(register, make_context(dag, run_id, run_after=run_after)).result


def _publish(dag_id: str, run_id: str, ami: dict, packages: list[Package], **kwargs: Any) -> tuple[Any, Any]:
    """Run PublishManifest for ``ami``; (its XCom, the task instance's other pushes)."""
    with DAG(dag_id, schedule=None) as dag:
        op = PublishManifest(
            task_id="publish_manifest", recipe="debian12", image="debian12", ami=ami, build=_build(packages),
            **kwargs,
        )  # fmt: skip
    context = make_context(dag, run_id)
    return run_operator(op, context).result, context["ti"].pushed


def _tags(ec2: Any, ami_id: str) -> dict[str, str]:
    image = ec2.boto3_client().describe_images(ImageIds=[ami_id])["Images"][0]
    return lifecycle.tags_of(image)


@pytest.fixture
def bucket(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty bucket in moto's S3, named by ``[amibake] manifest_bucket``."""
    ec2.boto3_client("s3").create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("AIRFLOW__AMIBAKE__MANIFEST_BUCKET", BUCKET)
    return BUCKET


def test_tags_s3_and_what_changed_since_the_previous_ami(ec2: Any, bucket: str, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.org/")
    first = _register(ec2, "amibake_t_mf", "scheduled__2026-11-28T02:00:00+00:00", T0)
    summary, pushed = _publish("amibake_t_mf", "scheduled__2026-11-28T02:00:00+00:00", first, OLD)
    assert summary["previous_ami"] == "" and summary["changed"] == {"added": 0, "removed": 0, "updated": 0}
    assert pushed["changes"].endswith(f"{first['ami_id']} is the first AMI of image line amibake-debian12")

    second = _register(ec2, "amibake_t_mf", "scheduled__2026-11-29T02:00:00+00:00", T0 + timedelta(days=1))
    ec2.clear_requests()
    summary, pushed = _publish("amibake_t_mf", "scheduled__2026-11-29T02:00:00+00:00", second, NEW)

    folder = f"amibake-debian12/{second['ami_id']}/"
    assert summary == {
        "ami_id": second["ami_id"],
        "packages": 4,
        "sha256": manifest.list_sha256(NEW),
        "s3_key": folder + "packages.json",
        "changed": {"added": 1, "removed": 1, "updated": 1},
        "previous_ami": first["ami_id"],
    }
    assert pushed["changes"].splitlines()[:4] == [
        f"what changed in {second['ami_id']} since {first['ami_id']}: 1 updated, 1 added, 1 removed",
        "  updated  libc6.amd64     2.36-9+deb12u13 -> 2.36-9+deb12u14",
        "  added    cloud-init.all  22.4.2-1+deb12u3",
        "  removed  nano.amd64      7.2-1+deb12u1",
    ]
    assert f"s3://{BUCKET}/amibake-debian12/{first['ami_id']}/packages.json" in pushed["changes"]

    image = definition.load_named(defaults.images_dir(), "debian12")
    tags = _tags(ec2, second["ami_id"])
    assert {k: v for k, v in tags.items() if k in naming.MANIFEST_TAGS} == {
        naming.TAG_PACKAGES_SHA256: manifest.list_sha256(NEW),
        naming.TAG_VERSION: "0.1.0",
        naming.TAG_SCRIPTS_COMMIT: scripts_commit(defaults.scripts_dir()),
        naming.TAG_DEFINITION_SHA256: definition.canonical_hash(image),
        naming.TAG_RUN_URL: "https://airflow.example.org/dags/amibake_t_mf/runs/"
        "scheduled__2026-11-29T02%3A00%3A00%2B00%3A00",
        naming.TAG_MANIFEST: f"s3://{BUCKET}/{folder}",
    }
    assert tags[naming.TAG_RUN_ID] == "scheduled__2026-11-29T02:00:00+00:00"  # since registration
    (tagging,) = [r for r in ec2.requests if r["action"] == "CreateTags"]  # one call, our AMI only
    assert tagging["params"]["ResourceId.1"] == second["ami_id"]

    s3 = ec2.boto3_client("s3")
    document = s3.get_object(Bucket=BUCKET, Key=folder + "packages.json")["Body"].read()
    assert manifest.read_packages_document(document) == manifest.canonical(NEW)
    assert json.loads(document)["sha256"] == tags[naming.TAG_PACKAGES_SHA256]
    sbom = s3.get_object(Bucket=BUCKET, Key=folder + "sbom.cdx.json")["Body"].read().decode()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom) is None
    assert {c["purl"] for c in json.loads(sbom)["components"]} == {manifest.purl(p, "debian12") for p in NEW}

    # a retry writes the same tags and the same objects
    again, _ = _publish("amibake_t_mf", "scheduled__2026-11-29T02:00:00+00:00", second, NEW)
    assert again == summary and _tags(ec2, second["ami_id"]) == tags
    assert s3.get_object(Bucket=BUCKET, Key=folder + "sbom.cdx.json")["Body"].read().decode() == sbom


def test_without_a_bucket_nothing_is_written_and_a_missing_list_is_said_plainly(ec2: Any) -> None:
    """No bucket: no S3 object, no manifest tag; a previous AMI whose run has no build XCom is named,
    with where its list was looked for. The harness's task instance has no XCom store: its xcom_pull
    here records the lookup and answers None, as the Task SDK does for an XCom that does not exist
    (the real pull across runs is the next test's)."""
    first = _register(ec2, "amibake_t_mf2", "manual__2026-11-28T02:00:00+00:00", T0)
    second = _register(ec2, "amibake_t_mf2", "manual__2026-11-29T02:00:00+00:00", T0 + timedelta(days=1))
    with DAG("amibake_t_mf2", schedule=None) as dag:
        op = PublishManifest(task_id="publish_manifest", recipe="debian12", ami=second, build=_build(NEW),
                             manifest_bucket="")  # fmt: skip
    context = make_context(dag, "manual__2026-11-29T02:00:00+00:00")
    looked_up: list[dict] = []
    context["ti"].xcom_pull = lambda **kw: looked_up.append(kw)  # the harness's TI has no XCom store
    summary = run_operator(op, context).result
    assert looked_up == [{"task_ids": BUILD_TASK_ID, "dag_id": "amibake_t_mf2",
                          "run_id": "manual__2026-11-28T02:00:00+00:00"}]  # fmt: skip
    assert summary["previous_ami"] == first["ami_id"] and summary["s3_key"] == ""
    text = context["ti"].pushed["changes"]
    assert text.startswith(f"what changed since {first['ami_id']}: unknown, its package list was not found")
    assert "the XCom of remote_chroot_build in amibake_t_mf2 run manual__2026-11-28T02:00:00+00:00" in text
    tags = _tags(ec2, second["ami_id"])
    assert naming.TAG_MANIFEST not in tags and naming.TAG_RUN_URL not in tags
    assert tags[naming.TAG_DEFINITION_SHA256] == "none"  # the recipe alone, no definition


#: A DAG as a file, loaded by a real DagBag and synced to the metadata DB as the DAG processor would
#: (dag.test runs only serialized DAGs): the build task hands on the night's list (from STATE), the
#: real RegisterHVMAmi registers that night's snapshot, PublishManifest publishes it.
XCOM_DAG = """
import json, os
from airflow.sdk import DAG, task
from operators.ami import RegisterHVMAmi
from operators.manifest import PublishManifest

def state():
    return json.loads(open(os.environ["AMIBAKE_T_MF_STATE"]).read())

with DAG("amibake_t_mf_xcom", schedule=None):
    @task(task_id="remote_chroot_build")
    def build():
        return state()["build"]

    @task(task_id="frozen_snapshot")
    def snapshot():
        return state()["snapshot"]

    register = RegisterHVMAmi(task_id="register_hvm_ami", recipe="debian12", image="debian12",
                              snapshot=snapshot(), size_gib=2, deferrable=False)
    PublishManifest(task_id="publish_manifest", recipe="debian12", image="debian12",
                    ami=register.output, build=build(), manifest_bucket="")
"""


def test_without_a_bucket_the_previous_list_comes_from_its_runs_xcom(
    ec2: Any, airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real runs of one DAG (dag.test: the task runner, the metadata DB, the Task SDK's
    xcom_pull): last night's build task keeps its list in XCom and its AMI names the run by its
    tags; tonight's run finds that AMI, pulls that XCom and diffs against it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    dag_id = "amibake_t_mf_xcom"
    (tmp_path / "manifest_dag.py").write_text(XCOM_DAG)
    bag = DagBag(dag_folder=str(tmp_path / "manifest_dag.py"))
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()  # the configured bundles' rows, as the DAG processor makes them
    sync_bag_to_db(bag, "dags-folder", None)
    dag = bag.dags[dag_id]
    state = tmp_path / "state.json"
    monkeypatch.setenv("AMIBAKE_T_MF_STATE", str(state))
    moto = ec2.boto3_client()

    def night(packages: list[Package], when: datetime) -> tuple[Any, dict]:
        volume = moto.create_volume(Size=2, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
        tags = naming.resource_tags(build=when.strftime("%Y%m%d%H%M"), dag_id=dag_id, run_id="x",
                                    recipe="debian12", role=Role.SNAPSHOT)  # fmt: skip
        snapshot = moto.create_snapshot(
            VolumeId=volume, TagSpecifications=[naming.tag_specification("snapshot", tags)]
        )["SnapshotId"]
        state.write_text(
            json.dumps(
                {"build": _build(packages), "snapshot": {"snapshot_id": snapshot, "volume_id": volume}}
            )
        )
        run = dag.test(run_after=when)
        assert run.state == "success"
        return run, xcom_of(run, "register_hvm_ami")

    (last_night, first), (tonight, second) = night(OLD, T0), night(NEW, T0 + timedelta(days=1))
    assert _tags(ec2, first["ami_id"])[naming.TAG_RUN_ID] == last_night.run_id
    summary = xcom_of(tonight, "publish_manifest")
    assert summary["previous_ami"] == first["ami_id"] and summary["ami_id"] == second["ami_id"]
    assert summary["changed"] == {"added": 1, "removed": 1, "updated": 1}
    assert summary["s3_key"] == ""
    text = xcom_of(tonight, "publish_manifest", key="changes")
    assert text.splitlines()[1] == "  updated  libc6.amd64     2.36-9+deb12u13 -> 2.36-9+deb12u14"
    assert f"the XCom of {BUILD_TASK_ID} in {dag_id} run {last_night.run_id}" in text


def test_a_bad_build_record_is_refused_before_anything_is_tagged(ec2: Any) -> None:
    ami = _register(ec2, "amibake_t_mf3", "manual__x", T0)
    ec2.clear_requests()
    bad = {**_build(NEW), "packages": [{"name": "bash;reboot", "epoch": 0, "version": "1", "release": "1",
                                        "arch": "amd64"}]}  # fmt: skip
    with DAG("amibake_t_mf3", schedule=None) as dag:
        op = PublishManifest(task_id="publish_manifest", recipe="debian12", ami=ami, build=bad)
    with pytest.raises(Exception, match="build.packages: .*bash;reboot"):
        run_operator(op, make_context(dag, "manual__x"))
    assert [r for r in ec2.requests if r["action"] == "CreateTags"] == []
