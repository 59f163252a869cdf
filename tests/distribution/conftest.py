"""Distribution tests: the local EC2 API of tests/conftest.py (which serves every region, with the
shipped IAM policy enforced) and a verified AMI to distribute."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The operator harness of tests/operators runs an operator as the task runner + triggerer would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))

from distribution_helpers import make_verified_ami  # noqa: E402


@pytest.fixture
def source(ec2: Any) -> dict[str, str]:
    """A verified, available amibake AMI in the local EC2 API's own region, and its snapshot."""
    found = make_verified_ami(ec2)
    ec2.clear_requests()
    return found
