"""``SmokeInstance``: launch one instance of the new AMI and check its first boot, as EC2 boots it.

After ``RegisterHVMAmi``: the AMI is launched once, in the build's subnet and temporary security
group, and checked over SSH with the same ``include/scripts/instance-check`` the boot check runs on
the box, told the same expectations (``RemoteChrootBuild``'s XCom). Only an AMI that passed every
item is tagged ``amibake:verified=true``, and rotation counts only such AMIs
(:mod:`operators.rules.lifecycle`). ``TerminateSmokeInstance`` is its teardown.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from operators import defaults, metrics
from operators.base import AmibakeOperator
from operators.links.ec2 import EC2InstanceLink
from operators.rules import definition, launch, lifecycle, naming, records, remote, validation
from operators.rules.naming import Role

if TYPE_CHECKING:
    from airflow.sdk import Context


class SmokeCheckFailed(Exception):
    """The smoke instance did not pass (no 2/2, no login, or a failed check item)."""


class SmokeInstance(AmibakeOperator):
    """Launch one instance of the new AMI, wait for 2/2 status checks, log in, run instance-check.

    The instance: the AMI's root volume + ``defaults.SMOKE_EXTRA_GIB`` (so growpart has work to do),
    deleted with it; IMDSv2 only; in the build box's subnet (as EC2 describes the box) and the
    build's temporary security group; tagged at creation with the build's tags and the
    ``smoke-instance`` role; instance type ``smoke_instance_type``.

    It gets a fresh ed25519 LOGIN key and a fresh HOST key through ``#cloud-config`` user data
    (``operators.rules.launch.user_data``). The private login key exists only in this task's memory:
    not in XCom, a trigger, a file or a log line. So the wait for the status checks is a BLOCKING
    wait (botocore's ``instance_status_ok`` and ``system_status_ok`` waiters, through the provider's
    hook) in the worker slot, never a deferral: a resumed task would no longer have the key. For the
    same reason a retry cannot reuse an earlier try's instance: it finds it by tag, terminates it
    and launches a new one.

    Logged in as the image's login user (the expectations), at the address ``[amibake] ssh_address``
    names (public or private IP; ``connection``: private IP), with the host key it gave, it runs
    ``sudo -n bash -s -- <expectations>`` with instance-check on stdin; each item is logged as a
    PASS/FAIL line. Every item passed: the AMI is tagged ``amibake:verified=true``. Otherwise (or no
    2/2 in time, or no login) the AMI is deprecated now (the next whole minute, EC2's earliest), not
    tagged, the console output's tail goes to the log, and the task fails for good naming what
    failed (no retry: the AMI is already deprecated). Older AMIs are never touched here.

    With ``smoke_check`` off nothing is launched: the log says loudly that the AMI stays unverified
    and the task is SKIPPED, and so is rotation downstream (which would refuse an unverified AMI):
    the run succeeds, every older AMI stays, and the grid shows the skipped check.

    XCom: ``{"ami_id", "instance_id", "checks": {item: status}, "seconds", "verified": true}``.

    :param ami: ``RegisterHVMAmi``'s XCom.
    :param build: ``RemoteChrootBuild``'s XCom (its ``expectations``).
    :param box: ``LaunchBuildBox``'s XCom (subnet and security group of the build).
    :param instance_type: instance type of the smoke instance.
    :param smoke_check: False = register the AMI unverified, launch nothing.
    :param status_wait: (delay s, attempts) of the wait for 2/2 status checks.
    :param check_timeout: seconds the login may take (cloud-init installing the key), and again
        instance-check.
    """

    template_fields: Sequence[str] = (
        *AmibakeOperator.template_fields,
        "ami",
        "build",
        "box",
        "instance_type",
        "smoke_check",
    )
    operator_extra_links = (EC2InstanceLink(),)
    ui_color = "#c9e4f6"

    def __init__(
        self,
        *,
        ami: Any,
        build: Any,
        box: Any,
        instance_type: str = defaults.DEFAULT_SMOKE_INSTANCE_TYPE,
        smoke_check: Any = True,
        status_wait: tuple[int, int] = defaults.WAIT_INSTANCE_STATUS_OK,
        check_timeout: int = defaults.SMOKE_CHECK_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ami = ami
        self.build = build
        self.box = box
        self.instance_type = instance_type
        self.smoke_check = smoke_check
        self.status_wait = status_wait
        self.check_timeout = check_timeout

    def execute(self, context: Context) -> dict[str, Any]:
        """Validate, replace an earlier try's instance, launch, check, then verify or deprecate."""
        ami_id = records.check("ami", self.ami)["ami_id"]
        if not validation.as_bool({"smoke_check": self.smoke_check}, "smoke_check", True):
            from airflow.sdk.exceptions import AirflowSkipException

            self.log.warning(
                "smoke_check is off ([amibake] smoke_check or the run's Param): AMI %s is registered "
                "UNVERIFIED: no instance of it was launched or checked, it is not tagged %s=%s, and "
                "rotation is skipped (no AMI is retired on an unverified one)",
                ami_id,
                naming.TAG_VERIFIED,
                naming.VERIFIED,
            )
            raise AirflowSkipException(f"smoke_check is off: AMI {ami_id} is registered UNVERIFIED")
        expectations = records.check("build", self.build)["expectations"]
        box = records.check("box", self.box)
        group = validation.require_id(
            "box.security_group_id",
            box.get("security_group_id"),
            records.SECURITY_GROUP_ID_RE,
            "the build's security group id (sg-...) in LaunchBuildBox's XCom",
        )
        instance_type = validation.match_field(
            "smoke_instance_type",
            self.instance_type,
            validation.INSTANCE_TYPE_RE,
            "an EC2 instance type like t3.micro",
        )
        hook = self.hook
        build = self.build_of(context)
        earlier = hook.terminate_build_instances(build, Role.SMOKE)
        if earlier:
            self.log.info(
                "build %s: terminated smoke instance(s) %s of an earlier try (their key is gone)",
                build,
                ", ".join(earlier),
            )
        image = hook.describe_image(ami_id)
        root = next(m for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"])
        size = int(root["Ebs"]["VolumeSize"]) + defaults.SMOKE_EXTRA_GIB
        subnet_id = hook.retry_not_found(  # the box's subnet, as EC2 describes the box
            lambda: hook.describe_instance(box["instance_id"]), "InvalidInstanceID.NotFound"
        )["SubnetId"]
        login_key, host_key = launch.new_host_key(), launch.new_host_key()
        run_args = launch.run_instances_args(
            image_id=ami_id,
            instance_type=instance_type,
            subnet_id=subnet_id,
            user_data=launch.user_data(login_key[1], host_key),
            tags=self.tags(context, Role.SMOKE),
            security_group_ids=[group],
            root_volume=(image["RootDeviceName"], size),
        )
        token = f"amibake-{build}-smoke-{context['ti'].try_number}"
        launched = time.monotonic()
        instance_id = hook.run_instance(run_args, token=token)["InstanceId"]
        self.persist_link(EC2InstanceLink, context, instance_id=instance_id)
        self.log.info(
            "build %s: launched smoke instance %s of %s (%s, %d GiB root, subnet %s, group %s)",
            build, instance_id, ami_id, instance_type, size, subnet_id, group,
        )  # fmt: skip
        started = time.monotonic()
        try:
            checks = self._check(instance_id, expectations, login_key[0], host_key[1])
        except SmokeCheckFailed as failed:
            raise self._reject(ami_id, instance_id, str(failed)) from failed
        seconds = round(time.monotonic() - started, 1)
        # launch to the last check: what the smoke instance adds to a night
        metrics.duration(definition.name_of_dag(self.dag_id), "smoke_check", time.monotonic() - launched)
        hook.mark_verified(ami_id)
        self.log.info(
            "AMI %s passed every smoke check in %.1f s: tagged amibake:verified=true", ami_id, seconds
        )
        return {
            "ami_id": ami_id,
            "instance_id": instance_id,
            "checks": {item: status for item, (status, _) in checks.items()},
            "seconds": seconds,
            "verified": True,
        }

    # -- the check -------------------------------------------------------------------------------
    def _check(
        self, instance_id: str, expectations: records.Expectations, private_key: str, host_key: str
    ) -> dict[str, tuple[str, str]]:
        """2/2, login, instance-check; every item as {item: (status, detail)}, or SmokeCheckFailed."""
        try:
            for waiter in ("instance_status_ok", "system_status_ok"):
                self.hook.wait(waiter, self.status_wait, InstanceIds=[instance_id])
        except Exception as exc:
            try:
                checks = self.hook.status_checks(instance_id)
            except Exception:  # the failure is the missing 2/2, not this lookup
                checks = ("unknown", "unknown")
            raise SmokeCheckFailed(
                f"status checks: no 2/2 within {self.status_wait[0] * self.status_wait[1]} s "
                f"(instance {checks[0] or 'none'}, system {checks[1] or 'none'}): {exc}"
            ) from exc
        self.log.info("smoke instance %s passed its status checks (2/2)", instance_id)
        instance = self.hook.describe_instance(instance_id)
        address = launch.instance_address(instance, defaults.setting("ssh_address"))
        user = expectations["login_user"]
        script = (defaults.scripts_dir() / "instance-check").read_bytes()
        command = shlex.join(remote.instance_check_argv(dict(expectations)))
        with contextlib.closing(self._login(address, user, private_key, host_key)) as client:
            from operators.hooks.box import run_streaming

            self.log.info("running on %s@%s: %s < instance-check", user, address, command)
            result = run_streaming(client, command, timeout_s=self.check_timeout, log=self.log, stdin=script)
        items, done = remote.parse_check_lines(result.lines)
        failed = [item for item, (status, _) in items.items() if status == remote.CHECK_FAIL]
        if failed:
            raise SmokeCheckFailed(f"failed items: {', '.join(failed)}")
        if result.timed_out or not done or result.exit_code != 0:
            raise SmokeCheckFailed(
                f"instance-check did not finish (exit code {result.exit_code}, "
                f"timed out: {result.timed_out}, {len(items)} item(s) reported)"
            )
        return items

    def _login(self, address: str, user: str, private_key: str, host_key: str) -> Any:
        """An SSH client logged in with the instance's key (cloud-init may still be installing it:
        retried until ``check_timeout``); SmokeCheckFailed when it never works."""
        from operators.hooks.box import instance_ssh_hook

        deadline = time.monotonic() + self.check_timeout
        while True:
            try:
                hook = instance_ssh_hook(
                    address=address, username=user, private_key=private_key, host_key=host_key
                )
                return hook.get_conn()
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise SmokeCheckFailed(
                        f"ssh-login: cannot log in as {user}@{address} with the instance's key "
                        f"and host key: {exc}"
                    ) from exc
                self.log.info("smoke instance not ready for login yet (%s); retrying", exc)
                time.sleep(defaults.SSH_POLL_INTERVAL_S)

    def _reject(self, ami_id: str, instance_id: str, why: str) -> Exception:
        """Deprecate the AMI now and log the console's tail; the error that fails the task for good."""
        from airflow.sdk.exceptions import AirflowFailException

        at = lifecycle.deprecate_now(datetime.now(UTC))
        try:
            self.hook.deprecate_image(ami_id, at)
            self.log.error("AMI %s failed its smoke check: deprecated at %s, not verified", ami_id, at)
        except Exception:
            self.log.exception("could not deprecate AMI %s; it stays unverified", ami_id)
        try:
            lines = self.hook.console_output(instance_id).splitlines()[-defaults.CONSOLE_TAIL_LINES :]
            self.log.error(
                "console output of smoke instance %s (last %d lines):\n%s",
                instance_id,
                len(lines),
                "\n".join(lines) or "(EC2 has captured none yet)",
            )
        except Exception:
            self.log.exception("could not read the console output of %s", instance_id)
        return AirflowFailException(
            f"smoke check of AMI {ami_id} on instance {instance_id} failed: {why}. The AMI is deprecated "
            "and not verified; every older AMI is kept"
        )


class TerminateSmokeInstance(AmibakeOperator):
    """Teardown: terminate this build's smoke instance(s), found by tag, and wait until terminated.

    Runs before ``TerminateBuildBox``, which deletes the security group the instance is in.
    XCom: ``{"terminated": [...]}``.
    """

    ui_color = "#e8b3b3"

    def execute(self, context: Context) -> dict[str, list[str]]:
        """Terminate and wait."""
        build = self.build_of(context)
        terminated = self.hook.terminate_build_instances(build, Role.SMOKE)
        self.log.info("build %s: terminated smoke instance(s) %s", build, terminated)
        return {"terminated": terminated}
