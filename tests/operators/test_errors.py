"""Errors no retry can fix fail at once, naming the fix; transient ones are still retried.

The classification is pure (``operators.rules.errors``) and tested on AWS's own error codes; the
wiring (``operators.base``: every ``execute*`` of every amibake operator) is tested against the
local EC2 API: a permanent answer makes the task fail on its FIRST try (``AirflowFailException``,
which the task runner never retries), still as the original exception type, and the operator's
own clean-up runs at once (a teardown does not run for a failed setup).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError
from operator_harness import make_context, run_operator

from operators.build_box import LaunchBuildBox
from operators.rules import naming
from operators.rules.errors import classify, classify_answer
from operators.rules.validation import ParamError

RUN_ID = "manual__2026-11-30T03:00:00+00:00"


def client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "RunInstances",
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("UnauthorizedOperation", 403),
        ("InvalidParameterValue", 400),
        ("InvalidParameterCombination", 400),
        ("InvalidAMIID.Malformed", 400),
        ("NoSuchEntity", 404),
        ("VcpuLimitExceeded", 400),
        ("AuthFailure", 401),
    ],
)
def test_permanent_answers(code: str, status: int) -> None:
    verdict = classify(client_error(code, "refused", status))
    assert verdict.permanent and verdict.fix, code


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("RequestLimitExceeded", 503),
        ("Throttling", 400),
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
        ("InsufficientInstanceCapacity", 500),
        ("DependencyViolation", 400),
        ("SomethingNew", 502),
        ("IncorrectState", 400),
    ],
)
def test_transient_answers(code: str, status: int) -> None:
    assert not classify(client_error(code, "try later", status)).permanent, code


def test_not_found_is_permanent_only_for_an_id_the_user_gave() -> None:
    """EC2 is eventually consistent: a just-made instance can be unknown to Describe for seconds."""
    user = {"ami-0123456789abcdef0": "base_ami", "subnet-0123456789abcdef0": "subnet_id"}
    theirs = client_error("InvalidAMIID.NotFound", "The image id '[ami-0123456789abcdef0]' does not exist")
    verdict = classify(theirs, user)
    assert verdict.permanent and "base_ami" in verdict.fix
    ours = client_error("InvalidInstanceID.NotFound", "The instance ID 'i-0abc' does not exist")
    assert not classify(ours, user).permanent
    assert not classify_answer("InvalidVolume.NotFound", "vol-1 does not exist", 400, {"": "empty"}).permanent


def test_validation_errors_are_permanent_and_name_the_field() -> None:
    verdict = classify(ParamError("subnet_id", "is required"))
    assert verdict.permanent and verdict.fix == "correct subnet_id"
    assert not classify(RuntimeError("the box did not answer")).permanent
    assert not classify(TimeoutError("timed out")).permanent


def _launch(dag_id: str, **kwargs: Any) -> tuple[DAG, LaunchBuildBox]:
    with DAG(dag_id, schedule=None) as dag:
        op = LaunchBuildBox(task_id="launch_build_box", recipe="debian12", instance_type="t3.small", **kwargs)
    return dag, op


def test_a_permanent_aws_error_fails_the_first_try_and_cleans_up(
    ec2: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rehearsal once retried NoSuchEntity three times over 5 min 22 s: now the first try fails."""
    ami = ec2.register_base_image("amibake-test-base")
    ec2.add_fault("RunInstances", "UnauthorizedOperation", 403, times=None, message="You are not authorized")
    dag, op = _launch("amibake_t_failfast", base_ami=ami)
    context = make_context(dag, RUN_ID, try_number=1, max_tries=3)
    with pytest.raises(ClientError) as failed:
        run_operator(op, context)
    assert isinstance(failed.value, AirflowFailException), "the task runner must not retry it"
    assert failed.value.response["Error"]["Code"] == "UnauthorizedOperation"
    assert any("IAM permissions" in note for note in failed.value.__notes__)
    build = naming.build_id(dag.dag_id, RUN_ID)
    left = ec2.boto3_client().describe_security_groups(
        Filters=[{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    )["SecurityGroups"]
    assert left == [], "a permanent failure is final: the launch removes its security group at once"


def test_a_validation_error_keeps_its_type_and_fails_at_once(ec2: Any, box_login: Any, subnet: dict) -> None:
    dag, op = _launch("amibake_t_failfast_param", base_ami="ami-nothex")
    with pytest.raises(ParamError) as refused:
        run_operator(op, make_context(dag, RUN_ID, try_number=1, max_tries=3))
    assert isinstance(refused.value, AirflowFailException) and refused.value.field == "base_ami"
    assert ec2.requests == []


def test_a_transient_error_is_left_to_the_retry(
    ec2: Any, box_login: Any, subnet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ami = ec2.register_base_image("amibake-test-base")
    ec2.add_fault("RunInstances", "InternalError", 500, times=None)
    # one botocore attempt per call, so the test does not wait out botocore's own back-off
    monkeypatch.setenv(
        "AIRFLOW_CONN_AMIBAKE_AWS",
        json.dumps(
            {
                **json.loads(os.environ["AIRFLOW_CONN_AMIBAKE_AWS"]),
                "extra": {**ec2.connection_extra(), "config_kwargs": {"retries": {"max_attempts": 1}}},
            }
        ),
    )
    dag, op = _launch("amibake_t_failfast_transient", base_ami=ami)
    with pytest.raises(ClientError) as failed:
        run_operator(op, make_context(dag, RUN_ID, try_number=1, max_tries=3))
    assert not isinstance(failed.value, AirflowFailException)
    build = naming.build_id(dag.dag_id, RUN_ID)
    kept = ec2.boto3_client().describe_security_groups(
        Filters=[{"Name": f"tag:{naming.TAG_BUILD_ID}", "Values": [build]}]
    )["SecurityGroups"]
    assert len(kept) == 1, "not the last try: the next try reuses the group"
    ec2.boto3_client().delete_security_group(GroupId=kept[0]["GroupId"])
