"""``RemoteChrootBuild`` ships ``include/scripts`` and the image definition's bundle to the box and
runs the build there."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from operators import defaults, metrics
from operators.base import AmibakeOperator
from operators.rules import definition, manifest, records, remote, validation

if TYPE_CHECKING:
    import paramiko
    from airflow.sdk import Context


class RemoteChrootBuild(AmibakeOperator):
    """Run ``build-image ... all`` on the box against the canvas (identified by its VOLUME ID).

    Ships the scripts over SFTP to ``/var/tmp/amibake/<build>/scripts`` and the image definition's
    bundle to ``.../<build>/image``, with a SHA256SUMS the box checks against the digest it is given
    before anything runs. The repositories' credentials (from the Airflow connections the definition
    names) go over the SSH channel as stdin of ``build-image credentials``: never argv, XCom, a
    rendered field or a log line. Then it aborts what an earlier try
    left running, then runs the build with a pty, logging every output line as it arrives (phase
    start / end with durations at INFO). No silence timeout; ``build_timeout`` is a hard limit.
    Every value reaches the remote shell as its own quoted argument. A failure names the phase
    and the exit code. XCom: ``records.Build``: ``{"volume_id", "expectations", "packages"}``:
    what a first boot of the image must show (login user, kernel arguments, baked host keys, SELinux),
    as build-image reported it after its verify phase (``SmokeInstance`` checks the AMI with it), and
    the image's package list, fetched from the file the ``packages`` event names over the same SSH
    client and checked against the announced sha256 (``PublishManifest`` tags, stores and diffs it).

    :param box: ``LaunchBuildBox``'s XCom.
    :param canvas: ``AttachCanvas``'s XCom.
    :param image: the image definition's name (``images/<image>.yaml``); '' = the recipe alone.
    :param mirror_url: package mirror for the recipe ('' = the recipe's default).
    :param boot_check: boot the finished image under qemu on the box before it counts as built.
    :param build_timeout: hard limit in seconds for the whole build.
    :param scripts_dir: local scripts directory (default ``[amibake] scripts_dir`` or the package's).
    """

    template_fields: Sequence[str] = (
        *AmibakeOperator.template_fields,
        "box",
        "canvas",
        "image",
        "mirror_url",
        "boot_check",
    )
    ui_color = "#d5f0c8"

    def __init__(
        self,
        *,
        box: Any,
        canvas: Any,
        image: str = "",
        mirror_url: str = "",
        boot_check: Any = True,
        build_timeout: int = defaults.BUILD_TIMEOUT_S,
        scripts_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.box = box
        self.canvas = canvas
        self.image = image
        self.mirror_url = mirror_url
        self.boot_check = boot_check
        self.build_timeout = build_timeout
        self.scripts_dir = scripts_dir
        self._channel: paramiko.Channel | None = None
        self._abort_argv: dict[str, Any] | None = None

    def execute(self, context: Context) -> records.Build:
        """Ship the scripts, abort a previous try, run the build, report the phase that failed."""
        from operators.hooks.box import box_session, run_streaming, ship_directory

        _, canvas = records.box_and_canvas(self.box, self.canvas)
        volume_id, device, size = canvas["volume_id"], canvas["device_name"], canvas["size_gib"]
        mirror = validation.validate_mirror_url(self.mirror_url or "")
        boot_check = validation.as_bool({"boot_check": self.boot_check}, "boot_check", True)
        if not boot_check:
            self.log.warning(
                "boot_check is off ([amibake] boot_check or the run's Param): this image will be "
                "registered WITHOUT having been booted"
            )
        local_scripts = Path(self.scripts_dir) if self.scripts_dir else defaults.scripts_dir()
        image = definition.load_named(defaults.images_dir(), self.image) if self.image else None
        credentials = remote.credentials_payload(self._credentials(image)) if image else b""
        build = self.build_of(context)
        ssh, common = box_session(
            self.box,
            self.ssh_conn_id,
            build=build,
            volume_id=volume_id,
            recipe=self.recipe,
            device=device,
            size=size,
        )
        common["mirror_url"] = mirror
        with contextlib.closing(ssh.get_conn()) as client:
            with tempfile.TemporaryDirectory(prefix="amibake-ship-") as staging:
                common["manifest_sha256"] = definition.stage(Path(staging), local_scripts, image)
                count = ship_directory(client, Path(staging), remote.remote_dir(build))
            common["image_bundle"] = image is not None
            self.log.info(
                "shipped %d files (%s%s) to %s, SHA256SUMS %s",
                count,
                local_scripts,
                f" and the bundle of {image.path.name}" if image else "",
                remote.remote_dir(build),
                common["manifest_sha256"],
            )
            self._abort_argv = common
            command = remote.build_image_command(action="all", boot_check=boot_check, **common)
            if context["ti"].try_number > 1:
                self._abort(client, "an earlier try may have left a build behind")
            if credentials:
                self._hand_over_credentials(client, credentials, common)
            self.log.info("running on the box: %s", command)
            result = run_streaming(
                client, command, timeout_s=self.build_timeout, log=self.log, on_channel=self._set_channel
            )
            if result.timed_out:
                phase = result.progress.current_phase or "unknown"
                self._abort(client, "build_timeout passed")
                raise AirflowException(
                    f"build-image exceeded build_timeout of {self.build_timeout} s in phase {phase!r}"
                )
            if result.exit_code != 0 or not result.progress.ok:
                raise AirflowException(
                    result.progress.failure(result.exit_code if result.exit_code is not None else -1)
                )
            packages = self._fetch_packages(client, result.progress.packages, sudo=common["sudo"])
        total = sum(result.progress.finished.values())
        self.log.info("build %s: image built on %s in %.1f s of phases", build, volume_id, total)
        metrics.phases(self.image or self.recipe, result.progress.finished)
        # what the smoke instance checks after registration, and what is in the image: checked here,
        # where they were reported
        return records.check(
            "build",
            {
                "volume_id": volume_id,
                "expectations": result.progress.expectations,
                "packages": manifest.to_records(packages) if packages is not None else None,
            },
        )

    def _fetch_packages(
        self, client: paramiko.SSHClient, event: dict[str, Any] | None, *, sudo: bool
    ) -> list[manifest.Package] | None:
        """The image's package list the box announced (``packages`` event): fetched over the same SSH
        client, checked against the announced sha256 and count and the contract's line format. None
        when no list was announced: the record's check then refuses the build, naming the field."""
        from operators.hooks.box import fetch_file

        if event is None:
            return None
        path, count, digest = manifest.packages_event(event)
        data = fetch_file(client, path, sudo=sudo, max_bytes=count * manifest.MAX_LINE_BYTES)
        packages = manifest.parse_list(data, sha256=digest, count=count)
        self.log.info("package list fetched from the box: %d packages, sha256 %s", len(packages), digest)
        return packages

    def _credentials(self, image: definition.ImageDefinition) -> dict[str, tuple[str, str]]:
        """``{repository: (login, password)}`` from the Airflow connections the definition names."""
        from airflow.sdk import BaseHook
        from airflow.sdk.log import mask_secret

        credentials = {}
        for repo in image.repositories:
            if not repo.connection_id:
                continue
            conn = BaseHook.get_connection(repo.connection_id)
            if conn.password:
                mask_secret(conn.password)
            credentials[repo.name] = (conn.login or "", conn.password or "")
        return credentials

    def _hand_over_credentials(self, client: paramiko.SSHClient, payload: bytes, common: dict) -> None:
        """``build-image credentials`` with the credentials on stdin: the box keeps them root-only."""
        from operators.hooks.box import run_streaming

        command = remote.build_image_command(action="credentials", **common)
        self.log.info("handing the repository credentials to the box over the SSH channel: %s", command)
        result = run_streaming(client, command, timeout_s=120, log=self.log, stdin=payload)
        if result.exit_code != 0:
            raise AirflowException(f"build-image credentials failed with exit code {result.exit_code}")

    def _set_channel(self, channel: paramiko.Channel | None) -> None:
        self._channel = channel

    def _abort(self, client: paramiko.SSHClient, why: str) -> None:
        """Run ``build-image abort`` (stop a running build, undo its mounts); log, never raise."""
        from operators.hooks.box import run_streaming

        if self._abort_argv is None:
            return
        command = remote.build_image_command(action="abort", **self._abort_argv)
        self.log.warning("%s: running %s", why, command)
        try:
            result = run_streaming(client, command, timeout_s=600, log=self.log)
            if result.exit_code != 0:
                self.log.warning("abort exited with %s", result.exit_code)
        except Exception:
            self.log.exception("abort failed")

    def on_kill(self) -> None:
        """Hang up the running build and abort it on the box, so nothing keeps running there."""
        channel = self._channel
        if channel is not None:
            try:
                channel.close()
            except (EOFError, OSError):  # the worker thread may be closing the same transport
                self.log.info("the build's SSH channel was already closing")
        if self._abort_argv is None:
            return
        from operators.hooks.box import box_ssh_hook

        try:
            ssh = box_ssh_hook(self.box, ssh_conn_id=self.ssh_conn_id)
            with contextlib.closing(ssh.get_conn()) as client:
                self._abort(client, "task killed")
        except Exception:
            self.log.exception("could not abort the build on the box")
