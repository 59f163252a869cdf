"""``LaunchBuildBox`` starts the temporary build box; ``TerminateBuildBox`` is its teardown.

What the box is launched with (user data with our login key and a per-build host key, the
RunInstances request) is in :mod:`operators.rules.launch`, shared with the preflight's dry run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from operators import defaults
from operators.base import AmibakeOperator, settings
from operators.links.ec2 import EC2InstanceLink, SecurityGroupLink
from operators.rules import launch, validation
from operators.rules.naming import Role
from operators.triggers.ec2 import InstanceRunningTrigger
from operators.triggers.ssh import SshReachableTrigger, ssh_banner_now

if TYPE_CHECKING:
    from airflow.sdk import Context


class LaunchBuildBox(AmibakeOperator):
    """Start the temporary build box and wait until it runs AND answers on SSH.

    Looks up this build's box first (by tags), so a retry never starts a second one. The box is
    tagged at creation (instance, root volume, network interface), requires IMDSv2, and sits in a
    temporary security group that admits tcp/22 only from ``[amibake] ssh_cidr``. If this task
    fails for good after creating something, it terminates the box and deletes the group itself
    (a teardown does not run when its setup failed).

    XCom: ``{"build_id", "instance_id", "address", "port", "availability_zone",
    "security_group_id", "ssh_address", "host_key"}`` (``host_key`` is a public key).

    :param instance_type: EC2 instance type of the box.
    :param subnet_id: subnet of the box (default ``[amibake] subnet_id``).
    :param base_ami: AMI id of the box, or '' to pick the newest AMI of ``base_ami_owner`` whose
        name matches ``base_ami_name``.
    :param instance_profile: optional IAM instance profile name or ARN.
    :param deferrable: wait in the triggerer (default) instead of a worker slot.
    :param waiter_delay: seconds between instance-state polls.
    :param waiter_max_attempts: polls before giving up.
    :param ssh_ready_timeout: seconds to wait for the box to answer on SSH.
    """

    template_fields: Sequence[str] = (
        *AmibakeOperator.template_fields,
        "instance_type",
        "subnet_id",
        "base_ami",
        "base_ami_owner",
        "base_ami_name",
        "instance_profile",
    )
    operator_extra_links = (EC2InstanceLink(), SecurityGroupLink())
    ui_color = "#f3d9b1"

    def __init__(
        self,
        *,
        instance_type: str = defaults.DEFAULT_INSTANCE_TYPE,
        subnet_id: str = "",
        base_ami: str = "",
        base_ami_owner: str = defaults.DEFAULT_BASE_AMI_OWNER,
        base_ami_name: str = defaults.DEFAULT_BASE_AMI_NAME,
        instance_profile: str = "",
        deferrable: bool = True,
        waiter_delay: int = defaults.WAIT_INSTANCE_RUNNING[0],
        waiter_max_attempts: int = defaults.WAIT_INSTANCE_RUNNING[1],
        ssh_ready_timeout: int = defaults.SSH_READY_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.instance_type = instance_type
        self.subnet_id = subnet_id
        self.base_ami = base_ami
        self.base_ami_owner = base_ami_owner
        self.base_ami_name = base_ami_name
        self.instance_profile = instance_profile
        self.deferrable = deferrable
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self.ssh_ready_timeout = ssh_ready_timeout

    # -- step 1: create (or find) the group and the box -----------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        """Validate, create or find the security group and the box, then wait until it runs."""
        conf = settings()
        params = validation.validate_build(
            {
                "recipe": self.recipe,
                "instance_type": self.instance_type,
                "subnet_id": self.subnet_id,
                "base_ami": self.base_ami,
                "base_ami_owner": self.base_ami_owner,
                "base_ami_name": self.base_ami_name,
                "instance_profile": self.instance_profile,
            },
            conf,
        )
        from operators.hooks.box import public_key_of_connection

        authorized_key = public_key_of_connection(self.ssh_conn_id)
        hook = self.hook
        build = self.build_of(context)
        base = hook.resolve_base_ami(params.base_ami, params.base_ami_owner, params.base_ami_name)
        subnet = hook.subnet(params.subnet_id)
        self.log.info(
            "build %s: base AMI %s (%s), subnet %s in %s",
            build,
            base["ImageId"],
            base.get("Name"),
            subnet["SubnetId"],
            subnet["AvailabilityZone"],
        )
        with self._cleanup(context):
            sg_id = hook.ensure_security_group(
                build,
                vpc_id=subnet["VpcId"],
                ssh_cidr=params.ssh_cidr,
                tags=self.tags(context, Role.BUILD_SG),
            )
            self.persist_link(SecurityGroupLink, context, security_group_id=sg_id)
            run_args = launch.run_instances_args(
                image_id=base["ImageId"],
                instance_type=params.instance_type,
                subnet_id=params.subnet_id,
                user_data=launch.user_data(authorized_key, launch.new_host_key()),
                tags=self.tags(context, Role.BUILD_BOX),
                instance_profile=params.instance_profile,
                security_group_ids=[sg_id],
            )
            instance, created = hook.ensure_instance(
                build, run_args=run_args, attempt=context["ti"].try_number
            )
            instance_id = instance["InstanceId"]
            if created:
                self.log.info("build %s: launched build box %s", build, instance_id)
            else:
                self.log.info("build %s: reusing build box %s from an earlier try", build, instance_id)
            self.persist_link(EC2InstanceLink, context, instance_id=instance_id)
            return self.defer_or_wait(
                context,
                done=lambda: hook.instance_state(instance_id) == "running",
                trigger=InstanceRunningTrigger(
                    instance_id=instance_id,
                    waiter_delay=self.waiter_delay,
                    waiter_max_attempts=self.waiter_max_attempts,
                    **self.trigger_kwargs(),
                ),
                method_name="execute_running",
                event={"instance_id": instance_id},
            )

    def _recover_host_key(self, instance_id: str) -> str:
        """The public host key the box got through its user data (every try reads it back)."""
        encoded = self.hook.user_data(instance_id)
        key = launch.host_key_from_user_data(encoded) if encoded else ""
        if not key:
            raise RuntimeError(f"build box {instance_id} has no amibake host key in its user data")
        return key

    def _box_state(self, context: Context, instance_id: str) -> dict[str, Any]:
        """The XCom of this task, from the instance as EC2 describes it now."""
        instance = self.hook.describe_instance(instance_id)
        ssh_address = defaults.setting("ssh_address")
        host, port = self._ssh_endpoint(instance, ssh_address)
        return {
            "build_id": self.build_of(context),
            "instance_id": instance_id,
            "security_group_id": instance["SecurityGroups"][0]["GroupId"],
            "availability_zone": instance["Placement"]["AvailabilityZone"],
            "ssh_address": ssh_address,
            "address": host,
            "port": port,
            "host_key": self._recover_host_key(instance_id),
        }

    def _ssh_endpoint(self, instance: dict[str, Any], ssh_address: str) -> tuple[str, int]:
        """Where to reach the box: its IP on port 22, or the SSH connection's own host and port."""
        if ssh_address == "connection":
            from airflow.providers.ssh.hooks.ssh import SSHHook

            hook = SSHHook(ssh_conn_id=self.ssh_conn_id)
            return str(hook.remote_host), int(hook.port or 22)
        return launch.instance_address(instance, ssh_address), 22

    # -- step 2: running; wait until it answers on SSH --------------------------------------------
    def execute_running(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resumed when the instance runs (or the wait failed)."""
        with self._cleanup(context):
            instance_id = event.get("instance_id", "")
            if event.get("status") != "success":
                raise RuntimeError(f"build box {instance_id}: {event.get('message')}")
            state = self._box_state(context, instance_id)
            return self.defer_or_wait(
                context,
                done=lambda: ssh_banner_now(state["address"], state["port"]) != "",
                trigger=SshReachableTrigger(
                    host=state["address"],
                    port=state["port"],
                    timeout=self.ssh_ready_timeout,
                    instance_id=instance_id,
                ),
                wait=lambda: None,  # the login below retries until ssh_ready_timeout
                method_name="execute_reachable",
                event={"instance_id": instance_id},
            )

    # -- step 3: answers on SSH; log in once ------------------------------------------------------
    def execute_reachable(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resumed when the box answers on SSH (or never did): log in once, then hand it on."""
        with self._cleanup(context):
            instance_id = event.get("instance_id", "")
            if event.get("status") != "success":
                raise RuntimeError(f"build box {instance_id}: {event.get('message')}")
            state = self._box_state(context, instance_id)
            self._verify_login(state)
            return state

    def _verify_login(self, state: dict[str, Any]) -> None:
        """Log in with the connection's key (cloud-init may still be installing it: retry a while)."""
        from operators.hooks.box import box_ssh_hook

        deadline = time.monotonic() + self.ssh_ready_timeout
        while True:
            try:
                hook = box_ssh_hook(state, ssh_conn_id=self.ssh_conn_id)
                with contextlib.closing(hook.get_conn()) as client:
                    _, stdout, _ = client.exec_command("true", timeout=defaults.SSH_CONNECT_TIMEOUT_S)
                    if stdout.channel.recv_exit_status() != 0:
                        raise RuntimeError("`true` failed on the box")
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"cannot log in to build box {state['instance_id']}: {exc}") from exc
                self.log.info("build box not ready for login yet (%s); retrying", exc)
                time.sleep(defaults.SSH_POLL_INTERVAL_S)
        self.log.info(
            "build box %s answers on SSH at %s:%s", state["instance_id"], state["address"], state["port"]
        )

    def _cleanup(self, context: Context) -> contextlib.AbstractContextManager[None]:
        """On a final failure, terminate what this build launched (its teardown will not run)."""
        build = self.build_of(context)

        def remove() -> None:
            self.hook.terminate_build_instances(build)
            self.hook.delete_security_groups(build)

        return self.cleanup_on_final_failure(context, "launching the build box", remove)


class TerminateBuildBox(AmibakeOperator):
    """Teardown: terminate this build's box(es), wait until terminated, delete the security group.

    Finds everything by the build's tags (not XCom), so it also cleans up after a partial failure.
    XCom: ``{"terminated": [...], "security_groups": [...]}``.
    """

    ui_color = "#e8b3b3"

    def execute(self, context: Context) -> dict[str, list[str]]:
        """Terminate, wait, delete the group."""
        build = self.build_of(context)
        terminated = self.hook.terminate_build_instances(build)
        groups = self.hook.delete_security_groups(build)
        self.log.info("build %s: terminated %s, deleted security groups %s", build, terminated, groups)
        return {"terminated": terminated, "security_groups": groups}
