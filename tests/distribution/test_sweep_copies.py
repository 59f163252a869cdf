"""The sweeper in the distribution regions, against the local EC2 API in three regions: a copy left
half-made in another region is swept, judged by the run that made it and its own age, not by its
source's; the source, a good copy and a copy of a running night stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from distribution_helpers import DAG_ID, EU, RUN_ID, US_WEST, copies_of, distribute, make_verified_ami
from operator_harness import make_context

from operators.rules import naming
from operators.sweep import SweepOrphans

#: The night that built the source, a month before the run that copies it (RUN_ID)
SOURCE_RUN = "scheduled__2026-10-25T02:00:00+00:00"


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``[amibake] images_dir``: one definition copying to eu-west-1 and us-west-2, and one that
    cannot be read (the sweeper says so and sweeps the others' regions)."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "centos7.yaml").write_text(
        "name: centos7\nrecipe: centos7\n"
        f"distribution: {{regions: [{{region: {EU}, kms_key_id: alias/amibake}}, {{region: {US_WEST}}}]}}\n"
    )
    (folder / "broken.yaml").write_text("name: broken\nrecipe: [\n")
    monkeypatch.setenv("AIRFLOW__AMIBAKE__IMAGES_DIR", str(folder))
    return folder


def sweep(active_runs: set[tuple[str, str]] = frozenset()) -> list[dict[str, Any]]:
    """One sweep as the hourly DAG runs it; ``active_runs``: the DAG runs Airflow calls running."""
    with DAG("amibake_sweeper", schedule=None):
        op = SweepOrphans(task_id="sweep_orphans", max_age_hours=6)
    context = make_context(op.dag, "sweep")
    context["ti"].active_runs = set(active_runs)
    return op.execute(context)


def test_a_failed_copy_is_swept_in_its_region_by_its_own_age_and_run(
    ec2: Any, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_verified_ami(ec2, SOURCE_RUN, created=datetime.now(UTC) - timedelta(days=30))
    # eu-west-1 has no key alias/amibake: EC2 fails that copy after accepting it; us-west-2 is copied
    with pytest.raises(Exception, match="failed in 1 region"):
        distribute(source["ami_id"], {"regions": [{"region": EU, "kms_key_id": "alias/amibake"},
                                                  {"region": US_WEST}]})  # fmt: skip
    (failed,) = copies_of(ec2, EU, source["ami_id"])
    (good,) = copies_of(ec2, US_WEST, source["ami_id"])
    assert failed["State"] == "failed" and good["State"] == "available"
    tags = naming.tags_to_dict(failed["Tags"])
    # the copy names the run that made it and its own time; the source's build id stays (its line)
    assert (tags[naming.TAG_DAG_ID], tags[naming.TAG_RUN_ID]) == (DAG_ID, RUN_ID)
    assert tags[naming.TAG_BUILD_ID] == naming.build_id(DAG_ID, SOURCE_RUN)
    made = datetime.fromisoformat(tags[naming.TAG_CREATED_AT])
    assert datetime.now(UTC) - made < timedelta(minutes=5)
    ec2.clear_requests()

    # while the copying run runs, its copy stays, however old its source
    capsys.readouterr()
    assert sweep(active_runs={(DAG_ID, RUN_ID)}) == []
    log = capsys.readouterr().out  # the task log (Airflow's structlog writes it to stdout here)
    assert f"{EU}: keeping image {failed['ImageId']}: its build is still running" in log
    assert "broken.yaml" in log  # named, and the other definition's regions are swept
    # once it is over, the copy is a few seconds old: still kept (the source's month does not count)
    assert sweep() == []
    assert f"{EU}: keeping image {failed['ImageId']}: younger than 6.0 h" in capsys.readouterr().out
    assert not [r for r in ec2.requests if r["action"].startswith(("Deregister", "Delete"))]

    # seven hours later: the failed copy and its snapshot go, in its region only
    eu = ec2.boto3_client(region=EU)
    seven_hours_ago = (datetime.now(UTC) - timedelta(hours=7)).replace(microsecond=0).isoformat()
    (snapshot_id,) = [m["Ebs"]["SnapshotId"] for m in failed["BlockDeviceMappings"] if "Ebs" in m]
    aged = [{"Key": naming.TAG_CREATED_AT, "Value": seven_hours_ago}]
    eu.create_tags(Resources=[failed["ImageId"], snapshot_id], Tags=aged)
    swept = sweep()
    assert [(a["region"], a["kind"], a["id"]) for a in swept] == [
        (EU, "image", failed["ImageId"]),
        (EU, "snapshot", snapshot_id),
    ]
    assert [c["ImageId"] for c in ec2.calls("DeregisterImage", region=EU)] == [failed["ImageId"]]
    assert [c["SnapshotId"] for c in ec2.calls("DeleteSnapshot", region=EU)] == [snapshot_id]
    for region in (ec2.region, US_WEST):
        assert not [r for r in ec2.calls("DeregisterImage", region=region)]
        assert not [r for r in ec2.calls("DeleteSnapshot", region=region)]
    assert copies_of(ec2, EU, source["ami_id"]) == []
    assert [c["ImageId"] for c in copies_of(ec2, US_WEST, source["ami_id"])] == [good["ImageId"]]
