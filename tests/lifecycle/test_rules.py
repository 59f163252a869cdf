"""Pure tests of every sweeper and rotation rule in operators/lifecycle.py (no AWS, no Airflow)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from operators.rules import lifecycle, naming
from operators.rules.lifecycle import Inventory, RotationRefused, plan_rotation, plan_sweep

NOW = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)
AGE = timedelta(hours=6)
OLD = NOW - timedelta(hours=7)
YOUNG = NOW - timedelta(hours=1)


def tags(build: str | None, role: naming.Role, when: datetime | None = OLD, recipe: str = "centos7") -> list:
    """Our tag set for a build (or no amibake tags at all when build is None)."""
    if build is None:
        return [{"Key": "Name", "Value": "someone-else"}]
    out = naming.resource_tags(
        build=build,
        dag_id="amibake_debian12",
        run_id=f"run-{build}",
        recipe=recipe,
        role=role,
        created_at=when.isoformat() if when else None,
    )
    return [t for t in out if when is not None or t["Key"] != naming.TAG_CREATED_AT]


def instance(iid: str, build: str | None, state: str = "running", when: datetime | None = OLD) -> dict:
    return {
        "InstanceId": iid,
        "State": {"Name": state},
        "LaunchTime": NOW,
        "Tags": tags(build, "build-box", when),
    }


def volume(vid: str, build: str | None, attached_to: str | None = None, when: datetime | None = OLD) -> dict:
    attachments = [{"InstanceId": attached_to, "State": "attached"}] if attached_to else []
    return {
        "VolumeId": vid,
        "State": "in-use" if attached_to else "available",
        "CreateTime": NOW,
        "Attachments": attachments,
        "Tags": tags(build, "canvas", when),
    }


def group(gid: str, build: str | None, when: datetime | None = OLD) -> dict:
    return {"GroupId": gid, "Tags": tags(build, "build-sg", when)}


def snapshot(sid: str, build: str | None, when: datetime | None = OLD) -> dict:
    return {"SnapshotId": sid, "State": "completed", "StartTime": NOW, "Tags": tags(build, "snapshot", when)}


def image(
    aid: str,
    build: str | None,
    state: str = "available",
    created: datetime = OLD,
    snap: str | None = None,
    recipe: str = "centos7",
    tag_snap: str | None = None,
    line: str | None = None,
    verified: bool = True,
) -> dict:
    t = tags(build, "ami", created, recipe)
    t.append({"Key": naming.TAG_IMAGE_LINE, "Value": line or f"amibake-{recipe}"})
    if verified:
        t.append({"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED})
    if tag_snap:
        t.append({"Key": naming.TAG_SNAPSHOT_ID, "Value": tag_snap})
    bdm = [{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}] if snap else []
    return {
        "ImageId": aid,
        "State": state,
        "CreationDate": created.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "BlockDeviceMappings": bdm,
        "Tags": t,
    }


def sweep(inv: Inventory, active: set[str] | None = None, max_age: timedelta = AGE) -> lifecycle.SweepPlan:
    return plan_sweep(inv, active_builds=active or set(), now=NOW, max_age=max_age)


def removed(plan: lifecycle.SweepPlan) -> list[tuple[str, str, str]]:
    return [(a.kind, a.resource_id, a.action) for a in plan.remove]


# --- sweeper -------------------------------------------------------------------------------------


def test_removes_every_kind_of_an_old_finished_build_in_dependency_order() -> None:
    inv = Inventory(
        snapshots=[snapshot("snap-1", "b1")],
        images=[image("ami-1", "b1", state="failed")],
        security_groups=[group("sg-1", "b1")],
        volumes=[volume("vol-1", "b1", attached_to="i-1")],
        instances=[instance("i-1", "b1")],
    )
    plan = sweep(inv)
    assert removed(plan) == [
        ("instance", "i-1", "terminate"),
        ("volume", "vol-1", "delete"),
        ("security-group", "sg-1", "delete"),
        ("image", "ami-1", "deregister"),
        ("snapshot", "snap-1", "delete"),
    ]
    assert plan.remove[1].detail == {"detach_from": "i-1"}
    assert all(a.build_id == "b1" and a.reason for a in plan.remove)


def test_never_touches_untagged_resources_even_old_and_unused() -> None:
    inv = Inventory(
        instances=[instance("i-x", None)],
        volumes=[volume("vol-x", None)],
        security_groups=[group("sg-x", None)],
        images=[image("ami-x", None, state="failed")],
        snapshots=[snapshot("snap-x", None)],
    )
    plan = sweep(inv, max_age=timedelta(0))
    assert plan.remove == [] and plan.keep == []


def test_never_touches_a_running_build() -> None:
    inv = Inventory(
        instances=[instance("i-1", "b1")],
        volumes=[volume("vol-1", "b1")],
        snapshots=[snapshot("snap-1", "b1")],
    )
    plan = sweep(inv, active={"b1"})
    assert plan.remove == []
    assert {a.reason for a in plan.keep} == {"its build is still running"}


def test_never_touches_anything_younger_than_the_age() -> None:
    inv = Inventory(
        instances=[instance("i-1", "b1", when=YOUNG)],
        volumes=[volume("vol-1", "b1", when=YOUNG)],
        security_groups=[group("sg-1", "b1", when=YOUNG)],
        images=[image("ami-1", "b1", state="pending", created=YOUNG)],
        snapshots=[snapshot("snap-1", "b1", when=YOUNG)],
    )
    plan = sweep(inv)
    assert plan.remove == []
    assert len(plan.keep) == 5 and all(a.reason.startswith("younger than 6.0 h") for a in plan.keep)


def test_age_exactly_at_the_threshold_is_old_enough() -> None:
    plan = sweep(Inventory(instances=[instance("i-1", "b1", when=NOW - AGE)]))
    assert removed(plan) == [("instance", "i-1", "terminate")]


def test_age_falls_back_to_ec2_timestamps_when_the_tag_is_missing() -> None:
    inst = instance("i-1", "b1", when=None)
    inst["LaunchTime"] = OLD
    young_vol = volume("vol-1", "b1", when=None)
    young_vol["CreateTime"] = YOUNG
    snap = snapshot("snap-1", "b1", when=None)
    snap["StartTime"] = OLD.replace(tzinfo=None)  # naive datetimes count as UTC
    plan = sweep(Inventory(instances=[inst], volumes=[young_vol], snapshots=[snap]))
    assert removed(plan) == [("instance", "i-1", "terminate"), ("snapshot", "snap-1", "delete")]


def test_a_security_group_without_a_creation_time_is_kept() -> None:
    plan = sweep(Inventory(security_groups=[group("sg-1", "b1", when=None)]))
    assert plan.remove == [] and plan.keep[0].reason == "no creation time: age unknown"


def test_the_created_at_tag_wins_over_ec2_timestamps() -> None:
    inst = instance("i-1", "b1", when=YOUNG)
    inst["LaunchTime"] = OLD
    assert sweep(Inventory(instances=[inst])).remove == []


def test_a_snapshot_used_by_an_ami_stays_even_if_the_ami_is_not_ours() -> None:
    inv = Inventory(
        images=[image("ami-x", None, snap="snap-1"), image("ami-2", "b2", tag_snap="snap-2")],
        snapshots=[snapshot("snap-1", "b1"), snapshot("snap-2", "b2"), snapshot("snap-3", "b3")],
    )
    plan = sweep(inv)
    assert removed(plan) == [("snapshot", "snap-3", "delete")]
    assert {(a.resource_id, a.reason) for a in plan.keep} == {
        ("snap-1", "used by ami-x"),
        ("snap-2", "used by ami-2"),
    }


def test_a_snapshot_of_a_half_registered_ami_goes_after_it() -> None:
    inv = Inventory(
        images=[image("ami-1", "b1", state="error", snap="snap-1")], snapshots=[snapshot("snap-1", "b1")]
    )
    assert removed(sweep(inv)) == [("image", "ami-1", "deregister"), ("snapshot", "snap-1", "delete")]


def test_available_amis_are_never_swept_so_retention_keeps_them() -> None:
    inv = Inventory(
        images=[image("ami-1", "b1", snap="snap-1"), image("ami-2", "b2", state="disabled", snap="snap-2")],
        snapshots=[snapshot("snap-1", "b1"), snapshot("snap-2", "b2")],
    )
    plan = sweep(inv, max_age=timedelta(0))
    assert plan.remove == []


def test_half_registered_amis_pending_too_long_or_failed_are_swept() -> None:
    inv = Inventory(
        images=[
            image("ami-p", "b1", state="pending"),
            image("ami-f", "b2", state="failed"),
            image("ami-young", "b3", state="pending", created=YOUNG),
        ]
    )
    plan = sweep(inv)
    assert removed(plan) == [("image", "ami-p", "deregister"), ("image", "ami-f", "deregister")]
    assert plan.remove[0].reason.startswith("still pending")
    assert plan.remove[1].reason.startswith("registration failed")


def test_terminated_instances_and_deleted_volumes_need_nothing() -> None:
    inv = Inventory(
        instances=[instance("i-1", "b1", state="terminated"), instance("i-2", "b1", state="shutting-down")],
        volumes=[{**volume("vol-1", "b1"), "State": "deleting"}],
    )
    plan = sweep(inv)
    assert plan.remove == [] and plan.keep == []


def test_a_volume_attached_to_a_foreign_or_kept_instance_stays() -> None:
    inv = Inventory(
        instances=[instance("i-live", "b2")],
        volumes=[volume("vol-1", "b1", attached_to="i-foreign"), volume("vol-2", "b1", attached_to="i-live")],
    )
    plan = sweep(inv, active={"b2"})
    assert removed(plan) == []
    assert sorted(a.resource_id for a in plan.keep if a.kind == "volume") == ["vol-1", "vol-2"]


def test_a_volume_attached_to_our_already_terminated_box_is_detached_and_deleted() -> None:
    inv = Inventory(
        instances=[instance("i-1", "b1", state="shutting-down")],
        volumes=[volume("vol-1", "b1", attached_to="i-1")],
    )
    plan = sweep(inv)
    assert removed(plan) == [("volume", "vol-1", "delete")] and plan.remove[0].detail == {
        "detach_from": "i-1"
    }


def test_sweep_rejects_naive_now_and_negative_age() -> None:
    with pytest.raises(ValueError, match="now"):
        plan_sweep(Inventory(), active_builds=(), now=NOW.replace(tzinfo=None), max_age=AGE)
    with pytest.raises(ValueError, match="max_age"):
        plan_sweep(Inventory(), active_builds=(), now=NOW, max_age=timedelta(hours=-1))


def test_run_refs_maps_builds_to_their_dag_runs() -> None:
    copy = image("ami-c", "b2", "pending")  # a copy of b2's AMI, made by a later run
    copy["Tags"] = [t for t in copy["Tags"] if t["Key"] != naming.TAG_RUN_ID]
    copy["Tags"].append({"Key": naming.TAG_RUN_ID, "Value": "run-copy"})
    inv = Inventory(
        instances=[instance("i-1", "b1"), instance("i-x", None)],
        snapshots=[snapshot("s", "b2")],
        images=[copy],
    )
    assert lifecycle.run_refs(inv) == {
        "b1": {("amibake_debian12", "run-b1")},
        "b2": {("amibake_debian12", "run-b2"), ("amibake_debian12", "run-copy")},
    }


def test_as_dict_is_json_friendly() -> None:
    action = lifecycle.Action("volume", "vol-1", "delete", "why", "b1", {"detach_from": "i-1"})
    assert action.as_dict() == {
        "kind": "volume",
        "id": "vol-1",
        "action": "delete",
        "reason": "why",
        "build_id": "b1",
        "detail": {"detach_from": "i-1"},
    }


# --- rotation ------------------------------------------------------------------------------------


def night(n: int) -> datetime:
    """Creation time of the AMI built n nights ago."""
    return NOW - timedelta(days=n)


def history(count: int, recipe: str = "centos7") -> tuple[list[dict], list[dict]]:
    """``count`` nightly AMIs (ami-0 newest), each with its own tagged snapshot."""
    images = [
        image(f"ami-{n}", f"b{n}", created=night(n), snap=f"snap-{n}", recipe=recipe) for n in range(count)
    ]
    snaps = [snapshot(f"snap-{n}", f"b{n}") for n in range(count)]
    return images, snaps


def rotate(images: list[dict], snaps: list[dict], new: str = "ami-0", keep: int = 2, grace: int = 1):
    return plan_rotation(images, snaps, recipe="centos7", new_image_id=new, keep=keep, grace=grace, now=NOW)


def test_rotation_keeps_n_deprecates_m_and_deregisters_the_rest_with_snapshots() -> None:
    images, snaps = history(6)
    plan = rotate(images, snaps, keep=2, grace=1)
    assert plan.kept == ["ami-0", "ami-1"]
    assert [a.resource_id for a in plan.deprecate] == ["ami-2"]
    assert plan.deprecate[0].detail == {"deprecate_at": "2026-11-25T12:01:00+00:00"}
    assert [a.resource_id for a in plan.deregister] == ["ami-3", "ami-4", "ami-5"]
    assert [a.resource_id for a in plan.delete_snapshots] == ["snap-3", "snap-4", "snap-5"]
    assert [a.action for a in plan.actions()] == ["deprecate"] + ["deregister"] * 3 + ["delete"] * 3


def test_rotation_orders_by_creation_date_not_by_list_order() -> None:
    images, snaps = history(4)
    plan = rotate(list(reversed(images)), snaps, keep=1, grace=0)
    assert plan.kept == ["ami-0"] and [a.resource_id for a in plan.deregister] == ["ami-1", "ami-2", "ami-3"]


def test_rotation_never_removes_the_last_good_ami() -> None:
    images, snaps = history(3)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(RotationRefused, match="keep must be an integer >= 1"):
            rotate(images, snaps, keep=bad)  # type: ignore[arg-type]
    with pytest.raises(RotationRefused, match="grace"):
        rotate(images, snaps, grace=-1)
    plan = rotate(images, snaps, keep=1, grace=0)
    assert plan.kept == ["ami-0"]


def test_rotation_refuses_before_the_new_ami_is_available() -> None:
    images, snaps = history(3)
    images[0]["State"] = "pending"
    with pytest.raises(RotationRefused, match="'pending', not available"):
        rotate(images, snaps)
    with pytest.raises(RotationRefused, match="does not exist"):
        rotate(images[1:], snaps)


def test_rotation_refuses_when_a_newer_ami_exists() -> None:
    images, snaps = history(3)
    with pytest.raises(RotationRefused) as err:
        rotate(images, snaps, new="ami-1")
    assert err.value.superseded and "ami-0 is newer" in str(err.value)


def test_rotation_refuses_an_untagged_or_other_recipe_new_ami() -> None:
    images, snaps = history(3)
    images.append(image("ami-u", None, created=NOW))
    images.append(image("ami-d", "bd", created=NOW, recipe="debian12"))
    for new in ("ami-u", "ami-d"):
        with pytest.raises(RotationRefused, match="not an amibake AMI of recipe 'centos7'"):
            rotate(images, snaps, new=new)


def test_rotation_ignores_untagged_other_recipe_and_unavailable_amis() -> None:
    images, snaps = history(2)
    images += [
        image("ami-untagged", None, created=night(30), snap="snap-u"),
        image("ami-deb", "bd", created=night(30), recipe="debian12", snap="snap-d"),
        image("ami-failed", "bf", state="failed", created=night(30)),
        image("ami-pending", "bp", state="pending", created=night(30)),
    ]
    snaps += [snapshot("snap-u", None), snapshot("snap-d", "bd")]
    plan = rotate(images, snaps, keep=1, grace=0)
    assert [a.resource_id for a in plan.actions()] == ["ami-1", "snap-1"]


def test_rotation_keeps_a_snapshot_still_used_by_another_ami() -> None:
    images, snaps = history(3)
    images.append(image("ami-copy", None, created=night(1), snap="snap-2"))  # someone's copy shares it
    plan = rotate(images, snaps, keep=1, grace=0)
    assert [a.resource_id for a in plan.deregister] == ["ami-1", "ami-2"]
    assert [a.resource_id for a in plan.delete_snapshots] == ["snap-1"]


def test_rotation_deletes_only_our_snapshots_also_those_named_by_tag() -> None:
    images, snaps = history(2)
    images[1]["BlockDeviceMappings"] = [{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": "snap-moto"}}]
    images[1]["Tags"].append({"Key": naming.TAG_SNAPSHOT_ID, "Value": "snap-1"})
    snaps.append(snapshot("snap-moto", None))
    plan = rotate(images, snaps, keep=1, grace=0)
    assert [a.resource_id for a in plan.delete_snapshots] == ["snap-1"]


def test_rotation_does_not_push_back_an_earlier_deprecation() -> None:
    images, snaps = history(3)
    images[1]["DeprecationTime"] = (NOW - timedelta(days=1)).isoformat()
    images[2]["DeprecationTime"] = (NOW + timedelta(days=1)).isoformat()
    plan = rotate(images, snaps, keep=1, grace=2)
    assert [a.resource_id for a in plan.deprecate] == ["ami-2"] and plan.deregister == []


def test_rotation_with_few_amis_does_nothing() -> None:
    images, snaps = history(2)
    plan = rotate(images, snaps, keep=2, grace=3)
    assert plan.kept == ["ami-0", "ami-1"] and plan.actions() == []


def test_rotation_counts_only_the_new_amis_image_line() -> None:
    """AMIs of another line (a test prefix, a manual build) neither count toward keep nor get retired."""
    images, snaps = history(4)
    tests = [
        image(
            f"ami-t{n}",
            f"t{n}",
            created=night(n) + timedelta(hours=1),
            snap=f"snap-t{n}",
            line="amibake-test",
        )
        for n in range(4)
    ]
    snaps += [snapshot(f"snap-t{n}", f"t{n}") for n in range(4)]
    plan = rotate(images + tests, snaps, keep=2, grace=1)
    assert plan.kept == ["ami-0", "ami-1"]
    assert [a.resource_id for a in plan.deprecate] == ["ami-2"]
    assert [a.resource_id for a in plan.deregister] == ["ami-3"]
    assert "image line amibake-centos7" in plan.deregister[0].reason
    touched = {a.resource_id for a in plan.actions()}
    assert not touched & ({f"ami-t{n}" for n in range(4)} | {f"snap-t{n}" for n in range(4)})
    test_plan = rotate(images + tests, snaps, new="ami-t0", keep=1, grace=0)
    assert test_plan.kept == ["ami-t0"]
    assert {a.resource_id for a in test_plan.deregister} == {"ami-t1", "ami-t2", "ami-t3"}


def test_the_image_line_of_an_untagged_ami_comes_from_its_amibake_name() -> None:
    """AMIs registered before the image-line tag existed: the prefix of ``naming.ami_name``."""
    name = naming.ami_name("amibake-centos7", NOW, "0123456789ab")
    assert naming.image_line({}, name) == "amibake-centos7"
    assert naming.image_line({}, "my manual image") == ""
    assert naming.image_line({naming.TAG_IMAGE_LINE: "prod"}, name) == "prod"
    new = image("ami-0", "b0", created=NOW)
    new["Tags"] = [t for t in new["Tags"] if t["Key"] != naming.TAG_IMAGE_LINE]
    with pytest.raises(RotationRefused, match="belongs to no image line"):
        rotate([new], [])
    new["Name"] = name
    assert rotate([new], []).kept == ["ami-0"]


# --- rotation counts verified AMIs only ------------------------------------------------------------


def unverify(img: dict) -> dict:
    """The AMI without the verified tag (its smoke check failed, was off, or predates the check)."""
    img["Tags"] = [t for t in img["Tags"] if t["Key"] != naming.TAG_VERIFIED]
    return img


def test_rotation_refuses_an_unverified_new_ami_and_changes_nothing() -> None:
    images, snaps = history(5)
    unverify(images[0])
    with pytest.raises(RotationRefused, match="ami-0 is not verified") as err:
        rotate(images, snaps, keep=1, grace=0)
    assert not err.value.superseded
    images[0]["Tags"].append({"Key": naming.TAG_VERIFIED, "Value": "false"})
    with pytest.raises(RotationRefused, match="not verified"):
        rotate(images, snaps, keep=1, grace=0)


def test_unverified_amis_never_count_toward_keep_nor_replace_a_verified_one() -> None:
    """Nights 1 and 2 failed their smoke check: keep=2 keeps the new AMI and night 3, not night 1."""
    images, snaps = history(6)
    unverify(images[1])
    unverify(images[2])
    plan = rotate(images, snaps, keep=2, grace=1)
    assert plan.kept == ["ami-0", "ami-3"]
    # verified: ami-4 within grace, ami-5 beyond; unverified ami-1/ami-2 have only 1 verified newer
    assert [a.resource_id for a in plan.deprecate] == ["ami-1", "ami-2", "ami-4"]
    assert [a.resource_id for a in plan.deregister] == ["ami-5"]
    assert "unverified" in plan.deprecate[0].reason and "1 verified AMI(s) newer" in plan.deprecate[0].reason
    assert [a.resource_id for a in plan.delete_snapshots] == ["snap-5"]


def test_an_unverified_ami_goes_once_keep_plus_grace_verified_amis_are_newer() -> None:
    images, snaps = history(6)
    unverify(images[3])
    plan = rotate(images, snaps, keep=2, grace=1)
    # ami-0, ami-1, ami-2 are verified and newer than ami-3: 3 >= keep + grace
    assert plan.kept == ["ami-0", "ami-1"]
    assert [a.resource_id for a in plan.deprecate] == ["ami-2"]
    assert [a.resource_id for a in plan.deregister] == ["ami-3", "ami-4", "ami-5"]
    assert "3 verified AMI(s) newer than it (>= keep=2 + grace=1)" in plan.deregister[0].reason
    assert [a.resource_id for a in plan.delete_snapshots] == ["snap-3", "snap-4", "snap-5"]


def test_the_first_verified_night_deprecates_older_unverified_amis_and_deregisters_none() -> None:
    """The night the smoke check is first on: every older AMI is unverified. The new one is the only
    good AMI; the others stay registered (deprecated) until keep + grace verified ones replace them."""
    images, snaps = history(4)
    for img in images[1:]:
        unverify(img)
    plan = rotate(images, snaps, keep=1, grace=0)
    assert plan.kept == ["ami-0"]
    assert [a.resource_id for a in plan.deprecate] == []  # 1 verified newer >= keep + grace = 1
    assert [a.resource_id for a in plan.deregister] == ["ami-1", "ami-2", "ami-3"]
    plan = rotate(images, snaps, keep=2, grace=1)
    assert plan.kept == ["ami-0"] and plan.deregister == [] and plan.delete_snapshots == []
    assert [a.resource_id for a in plan.deprecate] == ["ami-1", "ami-2", "ami-3"]


def test_an_unverified_ami_already_deprecated_is_not_deprecated_again() -> None:
    """A failed smoke check deprecated its AMI at once: rotation leaves that time as it is."""
    images, snaps = history(3)
    unverify(images[1])["DeprecationTime"] = (NOW - timedelta(minutes=5)).isoformat()
    plan = rotate(images, snaps, keep=2, grace=1)
    assert plan.kept == ["ami-0", "ami-2"] and plan.actions() == []


def test_deprecate_now_is_the_next_whole_minute() -> None:
    assert lifecycle.deprecate_now(NOW) == datetime(2026, 11, 25, 12, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        lifecycle.deprecate_now(NOW.replace(tzinfo=None))
