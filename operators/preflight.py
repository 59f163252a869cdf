"""Preflight: check a night's settings against AWS, the SSH connection and the mirror, creating nothing.

Two doors to the same checks (:func:`run_checks`; the decisions are in :mod:`operators.rules.preflight`):

- ``Preflight``, the nightly DAG's task after ``validate_params``: nothing is launched unless every
  check passes, and the failure lists every problem with its setting and fix, at once, without retry.
- ``python -m operators.preflight [--image NAME] [--conf KEY=JSON ...]``: the same checks before the
  first night, run where a task would run
  (``docker compose exec airflow-worker python -m operators.preflight``), so it uses the worker's
  connections, IAM principal and network. Exit code 0 = ready, 1 = a check failed, 2 = a bad value.

AWS sees only read-only calls (Describe*, kms:DescribeKey) and ``DryRun=True`` requests of the
night's creates, with the night's own arguments; an endpoint that ignores DryRun is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from operators import defaults
from operators.base import AmibakeOperator, settings
from operators.rules import definition, launch, naming, validation
from operators.rules import preflight as rules
from operators.rules.errors import classify, classify_answer, error_code
from operators.rules.naming import Role, tag_specification

if TYPE_CHECKING:
    from airflow.sdk import Context

    from operators.hooks.ec2 import BuildEc2Hook

#: Seconds the worker waits for the mirror's metadata.
MIRROR_TIMEOUT_S = 10


def run_checks(
    hook: BuildEc2Hook,
    params: validation.BuildParams,
    *,
    aws_conn_id: str,
    ssh_conn_id: str,
    tags: Callable[[Role], list[dict[str, str]]],
    build: str,
) -> list[rules.Check]:
    """Every check, in order; a check whose AWS call failed transiently raises (a retry may pass)."""
    checks = [_ssh_key(ssh_conn_id)]
    image = definition.load_named(defaults.images_dir(), params.image)
    checks += [
        _repository(repo.name, repo.connection_id) for repo in image.repositories if repo.connection_id
    ]
    subnet = _lookup(lambda: hook.subnet(params.subnet_id))
    checks += rules.subnet(subnet, params.subnet_id, params.ssh_address)
    if subnet:
        zone = subnet["AvailabilityZone"]
        types = {"instance_type": params.instance_type}
        if params.smoke_check:  # the smoke instance is launched in the build box's subnet
            types["smoke_instance_type"] = params.smoke_instance_type
        for field, type_name in types.items():
            try:
                offered: bool | None = hook.instance_type_offered(type_name, zone)
            except Exception as exc:
                if error_code(exc) != "UnauthorizedOperation":
                    raise
                offered = None
            checks.append(rules.instance_type(offered, type_name, zone, field))
    base, problem = _base_ami(hook, params)
    checks.append(rules.base_ami(base, problem, by_id=bool(params.base_ami)))
    if params.encrypted and params.kms_key_id:
        checks.append(_kms(aws_conn_id, params.kms_key_id))
    if subnet and base:
        checks += _dry_runs(hook, params, subnet, base, tags, build, ssh_conn_id)
    checks.append(_mirror(params))
    return checks


def _lookup(describe: Callable[[], dict]) -> dict | None:
    """A described resource, or None when AWS says it does not exist (transient errors raise)."""
    try:
        return describe()
    except ValueError:
        return None
    except Exception as exc:
        code = error_code(exc)
        if code.endswith((".NotFound", ".Malformed")):
            return None
        raise


def _ssh_key(conn_id: str) -> rules.Check:
    """The SSH connection exists, holds a private key and a login."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    from operators.hooks.box import public_key_of_connection

    try:
        login = SSHHook.get_connection(conn_id).login or ""
        public_key_of_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - any failure to read the key is the finding
        return rules.ssh_key(f"{type(exc).__name__}: {exc}", "", conn_id)
    return rules.ssh_key("", login, conn_id)


def _repository(repo: str, conn_id: str) -> rules.Check:
    """The connection of a repository that needs credentials exists and holds a login and password."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - a connection that cannot be read is the finding
        return rules.repository_credentials(repo, conn_id, f"{type(exc).__name__}: {exc}")
    if not conn.login or not conn.password:
        return rules.repository_credentials(repo, conn_id, "the connection has no login or no password")
    return rules.repository_credentials(repo, conn_id, "")


def _base_ami(hook: BuildEc2Hook, params: validation.BuildParams) -> tuple[dict | None, str]:
    """The base AMI the night would launch (deprecated ones included), or (None, why not)."""
    try:
        return hook.resolve_base_ami(params.base_ami, params.base_ami_owner, params.base_ami_name), ""
    except ValueError as exc:
        return None, str(exc)
    except Exception as exc:
        if classify(exc, {params.base_ami: "base_ami"}).permanent:
            return None, str(exc)
        raise


def _kms(aws_conn_id: str, key_id: str) -> rules.Check:
    """kms:DescribeKey (read-only) and a DryRun of GenerateDataKeyWithoutPlaintext (what EBS uses)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    kms = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="kms").conn
    try:
        metadata = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    except Exception as exc:
        if not error_code(exc) or not classify(exc, {key_id: "kms_key_id"}).permanent:
            raise
        return rules.kms_key(None, str(exc), key_id)
    check = rules.kms_key(metadata, "", key_id)
    if not check.ok:
        return check
    try:
        kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256", DryRun=True)
    except Exception as exc:
        code = error_code(exc)
        if code != "DryRunOperationException":
            if not code or not classify(exc).permanent:
                raise
            return rules.kms_key(None, f"cannot generate a data key: {exc}", key_id)
    return check


def _dry_runs(
    hook: BuildEc2Hook,
    params: validation.BuildParams,
    subnet: dict,
    base: dict,
    tags: Callable[[Role], list[dict[str, str]]],
    build: str,
    ssh_conn_id: str,
) -> list[rules.Check]:
    """The night's creates, with its arguments, as DryRun requests (see :mod:`operators.rules.preflight`).

    The arguments repeat what ``LaunchBuildBox`` and ``AttachCanvas`` send, minus the ids that only
    exist during the night (the security group: the dry run launches into the VPC's default one);
    tests/operators/test_preflight.py compares them with a real launch so the two cannot drift apart.
    """
    from operators.hooks.box import public_key_of_connection

    found = {
        params.subnet_id: "subnet_id",
        params.instance_type: "instance_type",
        base["ImageId"]: "base_ami",
        params.instance_profile: "[amibake] instance_profile",
        params.kms_key_id: "[amibake] kms_key_id",
        subnet["VpcId"]: "subnet_id (its VPC)",
        subnet["AvailabilityZone"]: "subnet_id (its availability zone)",
    }
    checks = []
    code, message = hook.dry_run(
        "create_security_group",
        GroupName=naming.resource_name(build, Role.BUILD_SG),
        Description=f"amibake build {build}: SSH to the temporary build box",
        VpcId=subnet["VpcId"],
        TagSpecifications=[tag_specification("security-group", tags(Role.BUILD_SG))],
    )
    checks.append(_dry_run_check("CreateSecurityGroup", code, message, found))

    try:
        authorized_key = public_key_of_connection(ssh_conn_id)
    except Exception:  # noqa: BLE001 - reported by the SSH key check; any key shapes the request
        authorized_key = "ssh-ed25519 AAAA amibake-preflight"
    run_args = launch.run_instances_args(
        image_id=base["ImageId"],
        instance_type=params.instance_type,
        subnet_id=params.subnet_id,
        user_data=launch.user_data(authorized_key, launch.new_host_key()),
        tags=tags(Role.BUILD_BOX),
        instance_profile=params.instance_profile,
    )
    run_args.update(MinCount=1, MaxCount=1)
    checks.append(_dry_run_check("RunInstances", *hook.dry_run("run_instances", **run_args), found))

    volume_args = launch.create_volume_args(
        zone=subnet["AvailabilityZone"],
        size_gib=params.canvas_size_gib,
        encrypted=params.encrypted,
        kms_key_id=params.kms_key_id,
        tags=tags(Role.CANVAS),
    )
    checks.append(_dry_run_check("CreateVolume", *hook.dry_run("create_volume", **volume_args), found))
    return checks


def _dry_run_check(action: str, code: str, message: str, found: dict[str, str]) -> rules.Check:
    """One DryRun answer as a check; a transient answer raises so the task retries."""
    if code and code not in ("DryRunOperation", "UnauthorizedOperation"):
        if not classify_answer(code, message, 0, found).permanent:
            raise RuntimeError(f"{action} (DryRun) answered {code}, which may pass on a retry: {message}")
    return rules.dry_run(action, code, message, settings=found)


def _mirror(params: validation.BuildParams) -> rules.Check:
    """Fetch the mirror's repository metadata from here (GET, short timeout)."""
    script = defaults.scripts_dir() / "recipes" / f"{params.recipe}.sh"
    default = rules.default_mirror_of(script.read_text()) if script.is_file() else ""
    url = rules.mirror_probe(params.recipe, params.mirror_url, default)
    if not url:
        return rules.mirror("", 0, "")
    from operators.hooks import repository

    status, error = repository.probe(url, timeout=MIRROR_TIMEOUT_S)
    return rules.mirror(url, status, error)


class Preflight(AmibakeOperator):
    """Check everything the night needs before anything is created (see the module docstring).

    XCom: the checks (``dataclasses.asdict`` of each ``rules.Check``); fails (no retry) listing every
    failed check.

    :param build: ``validate_params``'s output (the validated Params and settings).
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "build")
    ui_color = "#e6e6fa"

    def __init__(self, *, build: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build = build

    def execute(self, context: Context) -> list[dict[str, Any]]:
        """Run every check, log each line, fail listing every failure."""
        if not isinstance(self.build, dict):
            raise validation.ParamError(
                "build", f"must be validate_params' output (a dict), got {self.build!r}"
            )
        params = validation.validate_build(self.build, settings(), image=self.build.get("image", ""))
        checks = run_checks(
            self.hook,
            params,
            aws_conn_id=self.aws_conn_id,
            ssh_conn_id=self.ssh_conn_id,
            tags=lambda role: self.tags(context, role),
            build=self.build_of(context),
        )
        for check in checks:
            (self.log.info if check.ok and not check.warning else self.log.warning)("%s", check.line())
        rules.raise_on_failure(checks)
        return [dataclasses.asdict(c) for c in checks]


def main(argv: list[str] | None = None) -> int:
    """``python -m operators.preflight``: print one line per check; exit 0 ready, 1 failed, 2 bad value."""
    parser = argparse.ArgumentParser(
        prog="python -m operators.preflight",
        description="Check amibake's settings before a night: creates nothing (read-only and DryRun calls).",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a trigger parameter of the image's DAG, as the run's conf would carry it (repeatable)",
    )
    parser.add_argument(
        "--image",
        default=defaults.DEFAULT_RECIPE,
        help=f"the image definition (images/<NAME>.yaml) to check; default {defaults.DEFAULT_RECIPE}",
    )
    args = parser.parse_args(argv)
    try:
        conf = validation.parse_conf_items(args.conf)
    except ValueError as exc:
        parser.error(str(exc))
    from operators.hooks.ec2 import BuildEc2Hook

    try:
        validation.refuse_undeclared(conf)
        params = validation.validate_image_build(
            definition.load_named(defaults.images_dir(), args.image), conf, settings()
        )
    except (validation.ParamError, definition.DefinitionError) as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 2
    aws_conn_id, ssh_conn_id = defaults.setting("aws_conn_id"), defaults.setting("ssh_conn_id")
    run_id = f"preflight__{datetime.now(UTC).isoformat(timespec='seconds')}"
    dag_id = definition.dag_id(params.image)
    build = naming.build_id(dag_id, run_id)
    checks = run_checks(
        BuildEc2Hook(aws_conn_id=aws_conn_id),
        params,
        aws_conn_id=aws_conn_id,
        ssh_conn_id=ssh_conn_id,
        tags=lambda role: naming.resource_tags(
            build=build, dag_id=dag_id, run_id=run_id, recipe=params.recipe, role=role
        ),
        build=build,
    )
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"preflight: {len(failed)} of {len(checks)} checks failed" if failed else "preflight: ready")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
