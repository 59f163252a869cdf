"""Lifecycle fixtures on top of tests/conftest.py (Airflow home, moto behind the recording proxy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The operator harness of tests/operators runs an operator as the task runner + triggerer would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))


@pytest.fixture
def ec2(ec2: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The shared empty moto + recorder, able to answer EnableImageDeprecation.

    moto 5.2.5 does not implement EnableImageDeprecation (its server answers HTTP 500
    NotImplementedError), so for the duration of the test this adds that one action to moto's AMI
    responses (moto runs in this process): it stores DeprecateAt on moto's image, which
    DescribeImages then returns as DeprecationTime. It stands in for the one call that cannot run
    here; the tests assert the request our code sent, as recorded by the proxy.
    """
    from moto.core.responses import ActionResult
    from moto.ec2.responses.amis import AmisResponse

    def enable_image_deprecation(self: AmisResponse) -> ActionResult:
        image = self.ec2_backend.describe_images(ami_ids=[self._get_param("ImageId")])[0]
        image.deprecation_time = self._get_param("DeprecateAt")
        return ActionResult({"Return": True})

    monkeypatch.setattr(AmisResponse, "enable_image_deprecation", enable_image_deprecation, raising=False)
    return ec2
