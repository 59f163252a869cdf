"""Fixtures of the local EC2 API's AWS rules (``rehearsal.aws_rules``) on top of tests/conftest.py.

Every test here runs the product's own code (``BuildEc2Hook``, the operators through the operator
harness of tests/operators, the triggers as the triggerer rebuilds them) against the local EC2 API
with the rules on, and asserts both what the rule answered and the requests the product SENT, as the
proxy recorded them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))

# a real box with the canvas mounted by build-image, as FrozenSnapshot meets it
from test_snapshot import mounted_canvas  # noqa: E402, F401


@pytest.fixture
def hook(ec2: Any) -> Any:
    """The product's EC2 hook on the ``amibake_aws`` connection: the suite's local EC2 API, whose
    IAM policy (docs/iam-policy.json) the product's requests must pass as well."""
    from operators.hooks.ec2 import BuildEc2Hook

    return BuildEc2Hook(aws_conn_id="amibake_aws")


@pytest.fixture
def moto(ec2: Any) -> Any:
    """A client straight to the suite's moto: sets up state without the rules, IAM or the recorder."""
    return ec2.boto3_client()


@pytest.fixture(scope="session")
def rules_only() -> Iterator[Any]:
    """A local EC2 API with the AWS rules and nothing else (no IAM policy, no boxes): what EC2 itself
    answers an administrator, for the tests of the rules themselves."""
    from rehearsal.ec2_local import LocalEc2, standard_extensions

    with LocalEc2(extensions=standard_extensions()) as server:
        yield server


@pytest.fixture
def aws(rules_only: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``rules_only``, emptied, with the ``amibake_aws`` connection pointing at it (the product's
    hook and triggers then talk to it). Not for a test that also uses ``ec2``."""
    from rehearsal.ec2_local import FAKE_ACCESS_KEY, FAKE_SECRET_KEY

    rules_only.reset()
    connection = {
        "conn_type": "aws",
        "login": FAKE_ACCESS_KEY,
        "password": FAKE_SECRET_KEY,
        "extra": rules_only.connection_extra(),
    }
    monkeypatch.setenv("AIRFLOW_CONN_AMIBAKE_AWS", json.dumps(connection))
    return rules_only


@pytest.fixture
def client(aws: Any) -> Any:
    """A client through ``aws``'s proxy (rules on, recorded), for asserting a rule's own answers."""
    return aws.boto3_client(recorded=True)


@pytest.fixture
def admin(aws: Any) -> Any:
    """A client straight to ``aws``'s moto, for setting up state the rules never saw being made."""
    return aws.boto3_client()
