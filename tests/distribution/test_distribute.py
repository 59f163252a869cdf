"""DistributeAmi against the local EC2 API in three regions (the build's us-east-1, eu-west-1 and
us-west-2): copies with tags and encryption, sharing, idempotent reruns, lost answers and one region
failing while the other succeeds. Requests are checked as SENT (the recording proxy, per region)."""

from __future__ import annotations

from typing import Any

import pytest
from distribution_helpers import (
    BUILD,
    EU,
    ORG,
    OU,
    US_WEST,
    copies_of,
    distribute,
    make_kms_key,
)

from operators.rules import naming
from operators.rules.validation import ParamError
from rehearsal.ec2_local import tag_specs

TWO_REGIONS = {"regions": [{"region": EU}, {"region": US_WEST}]}
#: How long a copy stays pending in the tests that must see the task defer on one: the local EC2
#: API's 0.5 s had passed before the task first looked, once, on a busy machine (2 s after CopyImage).
PENDING_S = 6.0


@pytest.fixture
def copies_stay_pending(ec2: Any) -> None:
    ec2.configure_rule("CopyImageRules", duration=PENDING_S)  # until the next test resets the API


@pytest.mark.usefixtures("copies_stay_pending")
def test_two_regions_are_copied_with_the_sources_tags(ec2: Any, source: dict[str, str]) -> None:
    record = distribute(source["ami_id"], TWO_REGIONS)

    copies = record.result["copies"]
    assert set(copies) == {EU, US_WEST} and record.result["shared_with"] == []
    # deferred on a pending copy (one trigger at a time; the other may be done by the resume)
    assert record.deferrals and set(record.deferrals) == {"ImageAvailableTrigger"}
    for region in (EU, US_WEST):
        (sent,) = ec2.calls("CopyImage", region=region)
        assert sent["SourceImageId"] == source["ami_id"] and sent["SourceRegion"] == ec2.region
        assert sent["Name"] == source["name"]
        assert sent["ClientToken"] == f"amibake-copy-{source['ami_id']}-{region}-1"
        assert "Encrypted" not in sent and "KmsKeyId" not in sent
        specs = tag_specs(sent)
        assert specs["image"][naming.TAG_BUILD_ID] == BUILD
        assert specs["image"][naming.TAG_VERIFIED] == naming.VERIFIED
        assert specs["image"][naming.TAG_SOURCE_AMI] == source["ami_id"]
        assert specs["image"][naming.TAG_SOURCE_REGION] == ec2.region
        assert naming.TAG_SNAPSHOT_ID not in specs["image"]  # a snapshot of us-east-1: not the copy's
        assert specs["snapshot"][naming.TAG_ROLE] == "snapshot"
        # and EC2 holds the copy, available, tagged, with its own snapshot in that region
        (copy,) = copies_of(ec2, region, source["ami_id"])
        assert copy["ImageId"] == copies[region] and copy["State"] == "available"
        assert naming.tags_to_dict(copy["Tags"])[naming.TAG_BUILD_ID] == BUILD
        snapshot_id = copy["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        (snapshot,) = ec2.boto3_client(region=region).describe_snapshots(SnapshotIds=[snapshot_id])[
            "Snapshots"
        ]
        assert naming.tags_to_dict(snapshot["Tags"])[naming.TAG_SOURCE_AMI] == source["ami_id"]
    assert not ec2.calls("CopyImage", region=ec2.region)  # never the build's own region


def test_a_copy_is_encrypted_with_the_regions_kms_key(ec2: Any, source: dict[str, str]) -> None:
    make_kms_key(ec2, EU, "alias/amibake")
    wanted = {"regions": [{"region": EU, "kms_key_id": "alias/amibake"}, {"region": US_WEST}]}
    record = distribute(source["ami_id"], wanted)

    (eu,) = ec2.calls("CopyImage", region=EU)
    assert (eu["Encrypted"], eu["KmsKeyId"]) == ("true", "alias/amibake")
    (west,) = ec2.calls("CopyImage", region=US_WEST)
    assert "Encrypted" not in west and "KmsKeyId" not in west
    (copy,) = copies_of(ec2, EU, source["ami_id"])
    assert copy["ImageId"] == record.result["copies"][EU]
    ebs = copy["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["KmsKeyId"] == "alias/amibake"


def test_a_kms_key_missing_in_its_region_fails_that_copy_only_and_the_next_try_finishes(
    ec2: Any, source: dict[str, str]
) -> None:
    """AWS fails such a copy after accepting it (state ``failed``); the other region is done, and the
    next try (once the key exists) deregisters the failed copy and copies again."""
    wanted = {"regions": [{"region": EU, "kms_key_id": "alias/amibake"}, {"region": US_WEST}]}
    with pytest.raises(
        Exception,
        match=r"failed in 1 region\(s\).*eu-west-1: copy ami-\w+ is failed: KMS key alias/amibake does not "
        "exist in eu-west-1",
    ):
        distribute(source["ami_id"], wanted)
    (failed,) = copies_of(ec2, EU, source["ami_id"])
    assert failed["State"] == "failed"
    (west,) = copies_of(ec2, US_WEST, source["ami_id"])
    assert west["State"] == "available"

    make_kms_key(ec2, EU, "alias/amibake")
    ec2.clear_requests()
    record = distribute(source["ami_id"], wanted, try_number=2)
    assert [c["ImageId"] for c in ec2.calls("DeregisterImage", region=EU)] == [failed["ImageId"]]
    (again,) = ec2.calls("CopyImage", region=EU)
    assert again["ClientToken"].endswith("-2")  # a new try, a new token
    assert not ec2.calls("CopyImage", region=US_WEST)
    assert record.result["copies"] == {
        EU: copies_of(ec2, EU, source["ami_id"])[0]["ImageId"],
        US_WEST: west["ImageId"],
    }


def test_a_rerun_creates_and_changes_nothing(ec2: Any, source: dict[str, str]) -> None:
    wanted = {**TWO_REGIONS, "accounts": ["111122223333"], "organization_arns": [ORG]}
    first = distribute(source["ami_id"], wanted).result
    ec2.clear_requests()
    again = distribute(source["ami_id"], wanted, try_number=2)

    assert again.result == first and again.deferrals == []
    mutating = [r["action"] for r in ec2.requests if not r["action"].startswith("Describe")]
    assert mutating == []


def test_a_lost_copy_answer_is_retried_with_its_token_and_makes_one_copy(
    ec2: Any, source: dict[str, str]
) -> None:
    """EC2 copied, the answer never arrived: botocore sends the same request again, and the
    ClientToken gets the original copy (as EC2 answers a repeated token)."""
    ec2.add_fault("CopyImage", when="after", drop_connection=True, region=EU)
    record = distribute(source["ami_id"], TWO_REGIONS)

    sent = ec2.calls("CopyImage", region=EU)
    assert len(sent) == 2 and sent[0] == sent[1]
    (copy,) = copies_of(ec2, EU, source["ami_id"])
    assert record.result["copies"][EU] == copy["ImageId"]


def test_a_retry_after_answers_lost_for_good_finds_the_copy_by_tag(ec2: Any, source: dict[str, str]) -> None:
    """Every answer of CopyImage is lost (EC2 acted on the first): the try fails naming eu-west-1,
    and the next try finds the copy by its tag and copies nothing again."""
    ec2.add_fault("CopyImage", when="after", drop_connection=True, region=EU, times=None)
    with pytest.raises(Exception, match="failed in 1 region\\(s\\).*eu-west-1: ConnectionClosedError"):
        distribute(source["ami_id"], {"regions": [{"region": EU}]})
    (made,) = copies_of(ec2, EU, source["ami_id"])  # made once, however often botocore resent
    ec2.clear_faults()
    ec2.clear_requests()

    record = distribute(source["ami_id"], {"regions": [{"region": EU}]}, try_number=2)
    assert not ec2.calls("CopyImage")
    assert record.result["copies"] == {EU: made["ImageId"]}
    assert len(copies_of(ec2, EU, source["ami_id"])) == 1


@pytest.mark.usefixtures("copies_stay_pending")
def test_a_resume_picks_up_a_copy_whose_answers_were_lost(ec2: Any, source: dict[str, str]) -> None:
    """The same lost answers with a second region still copying: the task defers on that copy, and
    on resume every region is looked at again, so the eu-west-1 copy is found by its tag in the same
    try and the task succeeds with one copy per region."""
    ec2.add_fault("CopyImage", when="after", drop_connection=True, region=EU, times=None)
    record = distribute(source["ami_id"], TWO_REGIONS)
    assert record.deferrals
    (made,) = copies_of(ec2, EU, source["ami_id"])
    assert record.result["copies"][EU] == made["ImageId"]
    assert len({c["ClientToken"] for c in ec2.calls("CopyImage", region=EU)}) == 1


def test_a_region_refusing_does_not_undo_the_other_and_a_rerun_finishes(
    ec2: Any, source: dict[str, str]
) -> None:
    """us-west-2 refuses before acting (a region not enabled for the account answers
    ``OptInRequired``): eu-west-1 is copied and shared, the task fails naming us-west-2 and why, and
    the next run copies us-west-2 only."""
    ec2.add_fault("CopyImage", "OptInRequired", 401, times=None, region=US_WEST)
    wanted = {**TWO_REGIONS, "accounts": ["111122223333"]}
    with pytest.raises(Exception, match="us-west-2: ClientError: .*OptInRequired") as failed:
        distribute(source["ami_id"], wanted)
    assert "eu-west-1" not in str(failed.value)
    (eu,) = copies_of(ec2, EU, source["ami_id"])
    assert eu["State"] == "available"
    assert [c["ImageId"] for c in ec2.calls("ModifyImageAttribute", region=EU)] == [eu["ImageId"]]
    assert not copies_of(ec2, US_WEST, source["ami_id"])
    ec2.clear_faults()
    ec2.clear_requests()

    record = distribute(source["ami_id"], wanted, try_number=2)
    assert not ec2.calls("CopyImage", region=EU) and len(ec2.calls("CopyImage", region=US_WEST)) == 1
    assert record.result["copies"] == {
        EU: eu["ImageId"],
        US_WEST: copies_of(ec2, US_WEST, source["ami_id"])[0]["ImageId"],
    }


def _launch_permissions(local: Any, region: str, image_id: str) -> list[dict[str, str]]:
    client = local.boto3_client(region=region)
    return client.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")[
        "LaunchPermissions"
    ]


def _volume_permissions(local: Any, region: str, snapshot_id: str) -> list[dict[str, str]]:
    client = local.boto3_client(region=region)
    answer = client.describe_snapshot_attribute(SnapshotId=snapshot_id, Attribute="createVolumePermission")
    return answer["CreateVolumePermissions"]


def test_sharing_adds_exactly_the_missing_permissions(ec2: Any, source: dict[str, str]) -> None:
    """Accounts, an organization and an OU may launch the source and its copy; the accounts may also
    create volumes from their snapshots (EC2 has no organization form of that). What is there
    already is not sent again."""
    ec2.boto3_client().modify_image_attribute(
        ImageId=source["ami_id"], LaunchPermission={"Add": [{"UserId": "111122223333"}]}
    )
    wanted = {
        "regions": [{"region": EU}],
        "accounts": ["111122223333", "444455556666"],
        "organization_arns": [ORG],
        "organizational_unit_arns": [OU],
    }
    record = distribute(source["ami_id"], wanted)
    assert record.result["shared_with"] == ["111122223333", "444455556666", ORG, OU]
    copy_id = record.result["copies"][EU]

    sent = {r: ec2.calls("ModifyImageAttribute", region=r) for r in (ec2.region, EU)}
    (home,) = sent[ec2.region]
    assert home["ImageId"] == source["ami_id"]
    assert {k: v for k, v in home.items() if k.startswith("LaunchPermission")} == {
        "LaunchPermission.Add.1.UserId": "444455556666",
        "LaunchPermission.Add.2.OrganizationArn": ORG,
        "LaunchPermission.Add.3.OrganizationalUnitArn": OU,
    }
    (eu,) = sent[EU]
    assert eu["ImageId"] == copy_id and eu["LaunchPermission.Add.1.UserId"] == "111122223333"
    everyone = [{"UserId": "111122223333"}, {"UserId": "444455556666"}, {"OrganizationArn": ORG},
                {"OrganizationalUnitArn": OU}]  # fmt: skip
    for region, image_id in ((ec2.region, source["ami_id"]), (EU, copy_id)):
        assert sorted(map(str, _launch_permissions(ec2, region, image_id))) == sorted(map(str, everyone))

    snapshots = {source["snapshot_id"]: ec2.region}
    (copy,) = copies_of(ec2, EU, source["ami_id"])
    snapshots[copy["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]] = EU
    modified = [(r, c) for r in (ec2.region, EU) for c in ec2.calls("ModifySnapshotAttribute", region=r)]
    assert sorted((r, c["SnapshotId"]) for r, c in modified) == sorted((r, s) for s, r in snapshots.items())
    for _, call in modified:
        assert call["Attribute"] == "createVolumePermission" and call["OperationType"] == "add"
        assert sorted(v for k, v in call.items() if k.startswith("UserId.")) == [
            "111122223333",
            "444455556666",
        ]
    for snapshot_id, region in snapshots.items():
        assert sorted(p["UserId"] for p in _volume_permissions(ec2, region, snapshot_id)) == [
            "111122223333",
            "444455556666",
        ]


def test_no_distribution_makes_no_ec2_call(ec2: Any, source: dict[str, str]) -> None:
    for nothing in (
        {},
        None,
        {"regions": [], "accounts": [], "organization_arns": [], "organizational_unit_arns": []},
    ):
        assert distribute(source["ami_id"], nothing).result == {"copies": {}, "shared_with": []}
    assert ec2.requests == []


def test_bad_distributions_are_refused_before_any_change(ec2: Any, source: dict[str, str]) -> None:
    with pytest.raises(ParamError, match=r"distribution\.regions\[0\]\.region: us-east-1 is the build's own"):
        distribute(source["ami_id"], {"regions": [{"region": ec2.region}]})
    with pytest.raises(ParamError, match=r"distribution\.accounts\[0\]: .* 12 digits"):
        distribute(source["ami_id"], {"accounts": ["1234"]})
    mutating = [r["action"] for r in ec2.requests if not r["action"].startswith("Describe")]
    assert mutating == []


def test_without_deferring_it_waits_in_the_worker(ec2: Any, source: dict[str, str]) -> None:
    record = distribute(source["ami_id"], TWO_REGIONS, deferrable=False)
    assert record.deferrals == [] and set(record.result["copies"]) == {EU, US_WEST}
    for region in (EU, US_WEST):
        (copy,) = copies_of(ec2, region, source["ami_id"])
        assert copy["State"] == "available"


def test_an_unverified_ami_is_neither_copied_nor_shared(ec2: Any, source: dict[str, str]) -> None:
    ec2.boto3_client().delete_tags(Resources=[source["ami_id"]], Tags=[{"Key": naming.TAG_VERIFIED}])
    with pytest.raises(Exception, match="is not verified .* neither copied nor shared"):
        distribute(source["ami_id"], {**TWO_REGIONS, "accounts": ["111122223333"]})
    assert [r["action"] for r in ec2.requests] == ["DescribeImages"]
