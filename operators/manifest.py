"""``PublishManifest``: say what is in the new AMI, where it came from, and what changed since the
previous AMI of its image line."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from operators import defaults
from operators.base import AmibakeOperator
from operators.rules import definition, lifecycle, manifest, naming, records

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The task whose XCom (``records.Build``) holds a run's package list.
BUILD_TASK_ID = "remote_chroot_build"


def amibake_version() -> str:
    """The installed ``amibake`` distribution's version ("unknown" when it is not installed)."""
    try:
        return metadata.version("amibake")
    except metadata.PackageNotFoundError:
        return "unknown"


def scripts_commit(scripts: Path) -> str:
    """The git commit of the shipped scripts when they are a checkout (``-dirty`` when files of that
    folder differ from it), else "unknown" (an installed package or an image without ``.git``)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(scripts), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return "unknown"
        changed = subprocess.run(
            ["git", "-C", str(scripts), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    dirty = "-dirty" if changed.returncode != 0 or changed.stdout.strip() else ""
    return head.stdout.strip() + dirty


def run_url(base_url: str, dag_id: str, run_id: str) -> str:
    """The Airflow UI's page of one DAG run, '' when the API server's ``[api] base_url`` is not set."""
    if not base_url:
        return ""
    return f"{base_url.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


class PublishManifest(AmibakeOperator):
    """Tag the new AMI with its package list's sha256 and its provenance, keep the list and a CycloneDX
    SBOM in S3 (``[amibake] manifest_bucket``), and show what changed since the previous AMI.

    Runs after ``RegisterHVMAmi``. Tags (``naming.MANIFEST_TAGS``): ``amibake:packages-sha256``,
    ``amibake:version``, ``amibake:scripts-commit``, ``amibake:definition-sha256``,
    ``amibake:run-url`` (when ``[api] base_url`` is set) and, with a bucket, ``amibake:manifest``:
    ``s3://BUCKET/<image line>/<ami id>/`` holding ``packages.json`` and ``sbom.cdx.json`` (written
    through the Amazon provider's ``S3Hook`` with the same AWS connection). The run id is on the AMI
    since registration (``amibake:run-id``).

    What changed: against the newest available amibake AMI of the same line other than this one
    (:func:`operators.rules.manifest.previous_image`), whose list is read from its ``amibake:manifest``
    folder in S3, else from the XCom of its own run's build task (its ``amibake:dag-id`` and
    ``amibake:run-id`` tags). The readable block goes to the task log and to the XCom key ``changes``
    (the task's XCom tab in the UI). No previous AMI, or no list for it, is said plainly; neither fails
    the task. Everything is idempotent: a retry writes the same tags and objects.

    XCom: ``records.Manifest``: ``{ami_id, packages, sha256, s3_key, changed, previous_ami}``.

    :param image: the image definition's name (its canonical hash is tagged; '' = the recipe alone).
    :param ami: ``RegisterHVMAmi``'s XCom.
    :param build: ``RemoteChrootBuild``'s XCom (the package list).
    :param manifest_bucket: S3 bucket ('' = none; default ``[amibake] manifest_bucket``).
    :param scripts_dir: the scripts shipped to the box (default ``[amibake] scripts_dir`` or the package's).
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "image", "ami", "build")
    ui_color = "#e3d7f4"

    def __init__(
        self,
        *,
        ami: Any,
        build: Any,
        image: str = "",
        manifest_bucket: str | None = None,
        scripts_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ami = ami
        self.build = build
        self.image = image
        self.manifest_bucket = manifest_bucket
        self.scripts_dir = scripts_dir

    def user_given_ids(self) -> dict[str, str]:
        """None: the AMI is this run's own, so a ``NotFound`` of it is eventual consistency."""
        return {}

    def execute(self, context: Context) -> records.Manifest:
        """Check the records, tag the AMI, write S3, diff against the previous AMI, return the summary."""
        ami = records.check("ami", self.ami)
        build = records.check("build", self.build)
        ami_id = ami["ami_id"]
        packages = manifest.from_records(build["packages"])
        digest = manifest.list_sha256(packages)
        bucket = defaults.setting("manifest_bucket") if self.manifest_bucket is None else self.manifest_bucket
        images = self.hook.account_images()
        current = next((i for i in images if i.get("ImageId") == ami_id), None) or self.hook.describe_image(
            ami_id
        )
        line = lifecycle.line_of(current)
        self.log.info("AMI %s (image line %s): %d packages, sha256 %s", ami_id, line, len(packages), digest)

        tags = self._provenance(context, digest)
        prefix = ""
        if bucket:
            prefix = manifest.s3_prefix(line, ami_id)
            self._write_s3(bucket, prefix, packages, current, line)
            tags[naming.TAG_MANIFEST] = manifest.tag_value(f"s3://{bucket}/{prefix}")
        else:
            self.log.info(
                "[amibake] manifest_bucket is not set: no packages.json or SBOM in S3; the list stays in "
                "this run's %s XCom, and the AMI carries its sha256",
                BUILD_TASK_ID,
            )
        self.hook.tag_manifest(ami_id, tags)
        self.log.info("tagged %s: %s", ami_id, ", ".join(f"{k}={v}" for k, v in tags.items()))

        previous = manifest.previous_image(images, line=line, current_ami=ami_id)
        changes = None
        if previous is None:
            text = f"what changed since the previous AMI: {ami_id} is the first AMI of image line {line}"
        else:
            old, where = self._previous_list(context, previous, bucket)
            if old is None:
                text = (
                    f"what changed since {previous['ImageId']}: unknown, its package list was not found "
                    f"({where})"
                )
            else:
                changes = manifest.diff(old, packages)
                text = manifest.render_changes(changes, previous_ami=previous["ImageId"], current_ami=ami_id)
                text += f"\n(the list of {previous['ImageId']} from {where})"
        for line_of_text in text.splitlines():
            self.log.info("%s", line_of_text)
        context["ti"].xcom_push(key="changes", value=text)
        return records.check(
            "manifest",
            {
                "ami_id": ami_id,
                "packages": len(packages),
                "sha256": digest,
                "s3_key": f"{prefix}{manifest.PACKAGES_OBJECT}" if prefix else "",
                "changed": changes.counts() if changes else {"added": 0, "removed": 0, "updated": 0},
                "previous_ami": previous["ImageId"] if previous is not None else "",
            },
        )

    # -- provenance --------------------------------------------------------------------------------------
    def _provenance(self, context: Context, digest: str) -> dict[str, str]:
        """The tags saying what is in the AMI and what made it (each at most 256 characters)."""
        from airflow.sdk import conf

        scripts = Path(self.scripts_dir) if self.scripts_dir else defaults.scripts_dir()
        if self.image:
            image = definition.load_named(defaults.images_dir(), self.image)
            definition_hash = definition.canonical_hash(image)
        else:
            definition_hash = "none"
        tags = {
            naming.TAG_PACKAGES_SHA256: digest,
            naming.TAG_VERSION: amibake_version(),
            naming.TAG_SCRIPTS_COMMIT: scripts_commit(scripts),
            naming.TAG_DEFINITION_SHA256: definition_hash,
        }
        url = run_url(
            conf.get("api", "base_url", fallback="") or "", context["dag"].dag_id, context["run_id"]
        )
        if url:
            tags[naming.TAG_RUN_URL] = url
        return {key: manifest.tag_value(value) for key, value in tags.items()}

    # -- S3 ---------------------------------------------------------------------------------------------
    def _s3(self) -> Any:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.hook.conn_region_name)

    def _write_s3(
        self,
        bucket: str,
        prefix: str,
        packages: list[manifest.Package],
        image: dict[str, Any],
        line: str,
    ) -> None:
        """``packages.json`` and ``sbom.cdx.json`` of the AMI (``image``: as DescribeImages gives it),
        in its folder of the bucket; the SBOM's time is the AMI's creation (the same on a retry)."""
        from datetime import UTC, datetime

        s3 = self._s3()
        ami_id = image["ImageId"]
        document = manifest.packages_document(packages, ami_id=ami_id, line=line, recipe=self.recipe)
        sbom = manifest.sbom(
            packages,
            recipe=self.recipe,
            ami_id=ami_id,
            ami_name=image.get("Name") or ami_id,
            line=line,
            created=lifecycle.created_at(image) or datetime.now(UTC),
            tool_version=amibake_version(),
        )
        for name, body in ((manifest.PACKAGES_OBJECT, document), (manifest.SBOM_OBJECT, sbom)):
            s3.load_string(body, key=prefix + name, bucket_name=bucket, replace=True)
            self.log.info("wrote s3://%s/%s%s (%d bytes)", bucket, prefix, name, len(body.encode()))

    # -- the previous AMI's list ----------------------------------------------------------------------
    def _previous_list(
        self, context: Context, previous: Any, bucket: str
    ) -> tuple[list[manifest.Package] | None, str]:
        """The previous AMI's package list and where it came from; (None, why) when not found."""
        tags = lifecycle.tags_of(previous)
        folder = tags.get(naming.TAG_MANIFEST, "")
        tried = []
        if bucket and folder.startswith("s3://"):
            from botocore.exceptions import BotoCoreError, ClientError

            where = f"{folder}{manifest.PACKAGES_OBJECT}"
            other_bucket, _, prefix = folder[len("s3://") :].partition("/")
            try:
                text = self._s3().read_key(key=prefix + manifest.PACKAGES_OBJECT, bucket_name=other_bucket)
                return manifest.read_packages_document(text), where
            except (BotoCoreError, ClientError, manifest.ManifestError) as exc:  # say so, go on
                self.log.warning("could not read %s: %s", where, exc)
                tried.append(f"{where}: {exc}")
        dag_id, run_id = tags.get(naming.TAG_DAG_ID), tags.get(naming.TAG_RUN_ID)
        if dag_id and run_id:
            where = f"the XCom of {BUILD_TASK_ID} in {dag_id} run {run_id}"
            value = context["ti"].xcom_pull(task_ids=BUILD_TASK_ID, dag_id=dag_id, run_id=run_id)
            if isinstance(value, dict) and value.get("packages"):
                try:
                    return manifest.from_records(value["packages"]), where
                except manifest.ManifestError as exc:
                    tried.append(f"{where}: {exc}")
            else:
                tried.append(f"{where}: none (a run before package lists, or its XCom was cleared)")
        else:
            tried.append("it has no amibake:dag-id / amibake:run-id tags")
        return None, "; ".join(tried)
