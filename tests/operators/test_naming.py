"""Unit tests of the shared naming rules as the operators use them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from operators.rules import naming
from operators.rules.naming import Role


def test_build_id_is_stable_per_run_and_differs_between_runs() -> None:
    a = naming.build_id("amibake_debian12", "manual__2026-11-25T20:00:00+00:00")
    assert a == naming.build_id("amibake_debian12", "manual__2026-11-25T20:00:00+00:00")
    assert a != naming.build_id("amibake_debian12", "manual__2026-11-25T20:00:01+00:00")
    assert len(a) == naming.BUILD_ID_LEN and int(a, 16) >= 0


def test_resource_tags_carry_every_key() -> None:
    tags = naming.tags_to_dict(
        naming.resource_tags(build="b" * 12, dag_id="d", run_id="r", recipe="centos7", role=Role.CANVAS)
    )
    assert tags[naming.TAG_ROLE] == "canvas"
    assert tags["Name"] == "amibake-bbbbbbbbbbbb-canvas"
    assert {
        naming.TAG_BUILD_ID,
        naming.TAG_DAG_ID,
        naming.TAG_RUN_ID,
        naming.TAG_RECIPE,
        naming.TAG_CREATED_AT,
    } <= set(tags)


def test_ami_name_uses_utc_and_build() -> None:
    when = datetime(2026, 11, 25, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert (
        naming.ami_name("amibake-centos7", when, "0123456789ab")
        == "amibake-centos7-20261126-0130-0123456789ab"
    )
    with pytest.raises(ValueError):
        naming.ami_name("a*b", when, "0123456789ab")
