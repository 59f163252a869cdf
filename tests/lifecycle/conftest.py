"""Fixtures of the sweeper and rotation tests: a private Airflow home, moto behind the recording
proxy (``rehearsal.ec2_local.LocalEc2``), and the ``amibake_aws`` connection pointing at it.

The Airflow home must be chosen before Airflow is first imported, so it is set when this file
loads, unless someone (a root conftest, CI) already chose one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
_OWN_HOME: str | None = None
if "AIRFLOW_HOME" not in os.environ:
    _OWN_HOME = tempfile.mkdtemp(prefix="amibake-lifecycle-airflow-")
    os.environ["AIRFLOW_HOME"] = _OWN_HOME
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[None]:
    """A migrated metadata DB in the Airflow home (removed afterwards if this file made the home)."""
    from airflow.utils import db

    db.initdb()
    yield
    if _OWN_HOME:
        shutil.rmtree(_OWN_HOME, ignore_errors=True)


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto + recording proxy on 127.0.0.1, empty, with ``amibake_aws`` pointing at the proxy.

    moto 5.2.5 does not implement EnableImageDeprecation (its server answers HTTP 500
    NotImplementedError), so this fixture adds that one action to moto's AMI responses for the
    duration of the test: it stores DeprecateAt on moto's image (returned by DescribeImages as
    DeprecationTime). It is a stand-in for the one call that cannot run here; the tests assert the
    request our code sent, as recorded by the proxy, not this stand-in's readback.
    """
    from moto.core.responses import ActionResult
    from moto.ec2.responses.amis import AmisResponse

    from rehearsal.ec2_local import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, LocalEc2

    def enable_image_deprecation(self: AmisResponse) -> ActionResult:
        image = self.ec2_backend.describe_images(ami_ids=[self._get_param("ImageId")])[0]
        image.deprecation_time = self._get_param("DeprecateAt")
        return ActionResult({"Return": True})

    monkeypatch.setattr(AmisResponse, "enable_image_deprecation", enable_image_deprecation, raising=False)
    with LocalEc2() as local:
        local.reset()
        conn = {
            "conn_type": "aws",
            "login": FAKE_ACCESS_KEY,
            "password": FAKE_SECRET_KEY,
            "extra": local.connection_extra(),
        }
        monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_AWS", json.dumps(conn))
        yield local
        local.reset()
