"""amibake image DAGs: one nightly rebuild DAG ``amibake_<name>`` per image definition.

Every ``images/<name>.yaml`` (``[amibake] images_dir``) becomes a DAG that rebuilds that image from
scratch (see ``DOC_MD``). A definition that fails validation does not take the others down: it
becomes a DAG of the same id that never runs on a schedule, whose description and doc name the file,
the field and the problem, and whose one task fails with that error if triggered.

Parsing reads the definition files and does no network I/O; the operators package resolves its
classes lazily and every provider hook is imported inside ``execute``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG, AsyncCallback, DeadlineAlert, DeadlineReference, Param, task

from operators import (
    AttachCanvas,
    DeleteCanvas,
    DistributeAmi,
    FingerprintInputs,
    FrozenSnapshot,
    LaunchBuildBox,
    PublishManifest,
    RegisterHVMAmi,
    RemoteChrootBuild,
    RotateAmis,
    SmokeInstance,
    TerminateBuildBox,
    TerminateSmokeInstance,
    defaults,
    notify,
)
from operators.preflight import Preflight
from operators.rules import definition

DOC_MD = """
### amibake: nightly AMI rebuild of one image definition

Builds the image of `{path}` (recipe **{recipe}**) **from scratch** on a temporary EC2 build box
and registers it as an HVM AMI:

1. **validate_params**: every trigger value and `[amibake]` setting is checked; a bad value fails
   here, naming the field, before any AWS resource exists. Conf keys the form does not declare are
   refused. **preflight** then asks AWS (read-only and DryRun calls), the SSH connection and the
   mirror whether the night can succeed, and fails listing every problem with its fix.
   **fingerprint_inputs** reads, from the worker, the metadata of every repository the image is
   built from (yum `repomd.xml`, apt `InRelease`), the definition's hash and the scripts shipped to
   the box. When they are those of the newest VERIFIED AMI of the image line, the night builds
   nothing: every later task is skipped, no EC2 resource is created and the run is green; the log
   says `unchanged since ami-... built ...`. The `force` Param, or the definition's `rebuild_after`
   age, builds anyway. A repository it cannot read means "cannot tell": the night builds.
2. **launch_build_box**: the box (IMDSv2, tagged at creation) in a temporary security group that
   admits SSH only from `[amibake] ssh_cidr`; waits until it runs and answers on SSH.
3. **attach_canvas**: a blank, encrypted gp3 volume attached to the box.
4. **remote_chroot_build**: ships `include/scripts` and the definition's bundle (its files, scripts
   and keys; checked by hash on arrival), hands the repositories' credentials over the SSH channel,
   and runs `build-image all` against the canvas (partition, mkfs, install in a chroot, the
   definition's packages, files and provisioning scripts, bootloader, SELinux relabel, clean-up,
   verify: which also searches the image for every repository password); its output streams into
   the task log.
5. **frozen_snapshot**: freeze the canvas filesystems, CreateSnapshot, thaw at once.
6. **register_hvm_ami**: RegisterImage (HVM, ENA, SR-IOV, legacy BIOS, IMDSv2), tagged with the
   fingerprint of its inputs (`amibake:fingerprint`, `amibake:inputs`), and announce it as the
   Asset `amibake://ami/<name>`.
   **publish_manifest** then tags the AMI with the digest of its package list (rpm / dpkg, listed
   on the box after verify) and its provenance (amibake version, scripts commit, definition hash,
   run URL), writes `packages.json` and a CycloneDX SBOM to `[amibake] manifest_bucket` when set, and
   shows what changed since the previous AMI of the line (its log and its `changes` XCom).
7. **smoke_instance**: launch ONE instance of the new AMI (`smoke_instance_type`, default
   t3.micro) in the build's subnet and security group, with a login key and a host key made for it
   alone (the private key lives only in the task's memory, so this wait holds a worker slot);
   wait for 2/2 status checks, log in and run the same `instance-check` as the boot check, with
   the definition's `smoke_checks`. Every
   item passed: the AMI is tagged `amibake:verified=true`. Otherwise the AMI is deprecated at once,
   stays unverified, the console's tail is in the log, and the run fails naming the failed items.
   `smoke_check` off: the AMI stays unverified (the log says so); this task and rotation are
   skipped, so nothing is retired.
8. **distribute_ami**: copies the newest verified AMI to the definition's `distribution.regions`
   (CopyImage, tags carried, encrypted with a region's `kms_key_id` when given) and shares it and
   its copies with the listed accounts, organizations and OUs. Idempotent by tag: it also runs on
   a night that builds nothing, so a region added later, or one that failed, is finished then. A
   region that fails does not undo the others; the task fails naming it.
9. **rotate_amis**: only after the new AMI is available AND verified: keep the newest `keep_amis`
   VERIFIED AMIs of its image line (recipe + AMI name prefix, `amibake-<name>` by default), set
   `deprecate_at` on the next `deprecate_grace`, deregister older ones with their snapshots (their
   copies in the distribution regions go with them).
   Unverified AMIs never count as good: they are deprecated, and deregistered once
   `keep_amis + deprecate_grace` verified AMIs are newer. A failed night never gets here, so
   every existing AMI stays as it was; AMIs of other prefixes are never touched.

**How long it takes**: the EC2 waits take a few minutes (snapshot and AMI: 5-30 min on AWS, held
by the triggerer, not a worker slot); the build itself takes 5-15 min for CentOS 7 (yum from the
configured mirror); the smoke instance 2-5 min. The offline rehearsal of the Debian 12 recipe
takes about 10 minutes (two qemu boots without KVM). A run that takes an hour longer than the
average of the last runs, or 4 hours in all, raises a deadline alert.

**When it fails**: the failed task's log names the build phase and the exit code, followed by the
tail of that phase's output (the full phase logs stay on the box under
`/var/tmp/amibake/<volume-id>/logs/` until the box is terminated). The teardowns have already
removed the box, its security group and the canvas; the sweeper DAG removes anything a crash
left. Fix the cause (a mirror, a quota, a Param) and trigger again, or clear the failed task: a
retry reuses what the run already made.

Teardowns **terminate_smoke_instance**, **terminate_build_box** (with its security group, after
the smoke instance in it is gone) and **delete_canvas** run whatever happens (the run is still
marked failed when a step failed). Every resource carries the `amibake:build-id` tag, so a retry
finds what an earlier try made and creates nothing twice, and the sweeper DAG removes anything a
crash left behind.

SSH keys: the box gets the PUBLIC half of the `amibake_ssh` connection's key through cloud-init
user data; there is no EC2 key pair to leak and the private key never leaves the connection (or
the secrets backend behind it): not in XCom, logs or the repository. Reached on its own IP, the box
also gets a per-build host key through user data, and every task verifies it.

Repository credentials come from the Airflow connection each repository names (`connection_id`,
any secrets backend): they reach the box over the SSH channel only, never argv, XCom or a log line.

Environment specifics live outside the code: connections `amibake_aws` / `amibake_ssh` and the
`[amibake]` configuration section (`ssh_address`, `ssh_cidr`, `subnet_id`, `schedule`, ...).
"""

AWS_STEP = {
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}


def _wait_budget(limits: tuple[int, int]) -> timedelta:
    """Execution timeout of a task that waits (deferred) up to delay x attempts, plus slack."""
    delay, attempts = limits
    return timedelta(seconds=delay * attempts + 1800)


def _switch(key: str) -> bool:
    """Default of a boolean Param from its ``[amibake]`` setting (validate_params rejects a bad one)."""
    return defaults.setting(key).lower() == "true"


def _schedule(defn: definition.ImageDefinition) -> str | None:
    """The definition's cron (None: manual runs only), or ``[amibake] schedule`` when it has none."""
    return defn.schedule if defn.schedule_set else defaults.setting("schedule")


def image_dag(defn: definition.ImageDefinition) -> DAG:
    """The nightly rebuild DAG of one image definition."""
    with DAG(
        dag_id=definition.dag_id(defn.name),
        description=defn.description or f"Nightly from-scratch rebuild of the {defn.name} HVM AMI",
        doc_md=DOC_MD.replace("{path}", defn.path.name).replace("{recipe}", defn.recipe),
        schedule=_schedule(defn),
        catchup=False,
        max_active_runs=1,
        tags=["amibake", "ami", defn.recipe],
        default_args={"owner": "amibake", "execution_timeout": timedelta(minutes=30)},
        on_failure_callback=notify.on_failure,
        deadline=[
            # far longer than usual: an hour past the average of the last runs (from the 3rd run on)
            DeadlineAlert(
                reference=DeadlineReference.AVERAGE_RUNTIME(max_runs=10, min_runs=3),
                interval=timedelta(hours=1),
                callback=AsyncCallback(notify.deadline_missed),
            ),
            # and from the first night: no build should take 4 hours from being queued
            DeadlineAlert(
                reference=DeadlineReference.DAGRUN_QUEUED_AT,
                interval=timedelta(hours=4),
                callback=AsyncCallback(notify.deadline_missed),
            ),
        ],
        params={
            "force": Param(
                False,
                type="boolean",
                title="Build even if nothing changed",
                description="Off: a night whose inputs (repository metadata, definition, shipped scripts) "
                "are those of the newest verified AMI builds nothing and stays green. On: build anyway.",
                section="Image",
            ),
            "ami_name_prefix": Param(
                None,
                type=["null", "string"],
                title="AMI name prefix",
                description="The AMI is named <prefix>-<UTC date>-<build id>. Empty = "
                f"{defaults.default_ami_prefix(defn.name)}.",
                section="Image",
            ),
            # the definition's fields the form may override for one run (validated as the file is)
            "canvas_size_gib": Param(
                defn.size_gib,
                type="integer",
                minimum=defaults.CANVAS_SIZE_MIN_GIB,
                maximum=defaults.CANVAS_SIZE_MAX_GIB,
                title="Image size (GiB)",
                description="Size of the canvas volume, and so of the AMI's root volume.",
                section="Image",
            ),
            "mirror_url": Param(
                defn.mirror or None,
                type=["null", "string"],
                title="Package mirror URL",
                description="Repository mirror for the recipe (CentOS 7: a vault or extended-support mirror "
                "base URL). Empty = the definition's, or the recipe's default.",
                section="Image",
            ),
            "boot_check": Param(
                # [amibake] boot_check: CentOS 7 on an EL7 box cannot boot-check yet (README)
                _switch("boot_check"),
                type="boolean",
                title="Boot-check before registering",
                description="Boot the finished canvas on the box the way EC2 boots it (NVMe, EC2 platform, "
                "IMDSv2) and run the instance checks over SSH; an image that fails is never registered. "
                "Off = registered unbooted (the task log says so).",
                section="Image",
            ),
            "base_ami": Param(
                None,
                type=["null", "string"],
                title="Base AMI id",
                description="AMI of the build box. Empty = the newest AMI matching owner + name below.",
                pattern=r"^ami-[0-9a-f]{8,17}$",
                section="Build box",
            ),
            "base_ami_owner": Param(
                defaults.DEFAULT_BASE_AMI_OWNER,
                type="string",
                title="Base AMI owner",
                description="Account id (or self/amazon) owning the build box's base AMI.",
                section="Build box",
            ),
            "base_ami_name": Param(
                defaults.DEFAULT_BASE_AMI_NAME,
                type="string",
                title="Base AMI name filter",
                description="Name pattern (* and ?) of the build box's base AMI.",
                section="Build box",
            ),
            "instance_type": Param(
                defaults.DEFAULT_INSTANCE_TYPE,
                type="string",
                title="Build box instance type",
                description="EC2 instance type of the temporary build box.",
                section="Build box",
            ),
            "subnet_id": Param(
                None,
                type=["null", "string"],
                title="Subnet id",
                description="Subnet of the build box. Empty = [amibake] subnet_id.",
                section="Build box",
            ),
            "smoke_check": Param(
                _switch("smoke_check"),
                type="boolean",
                title="Smoke-check after registering",
                description="Launch one instance of the new AMI, check its first boot over SSH, and only "
                "then tag it amibake:verified=true (rotation counts verified AMIs only). Off = the AMI stays "
                "unverified (the task log says so); the check and rotation are skipped.",
                section="Smoke check",
            ),
            "smoke_instance_type": Param(
                defaults.setting("smoke_instance_type"),
                type="string",
                title="Smoke instance type",
                description="EC2 instance type of the smoke instance (launched in the build box's subnet).",
                section="Smoke check",
            ),
            "keep_amis": Param(
                defn.keep,
                type="integer",
                minimum=defaults.KEEP_AMIS_RANGE[0],
                maximum=defaults.KEEP_AMIS_RANGE[1],
                title="AMIs to keep",
                description="After the new AMI is available, keep this many newest AMIs of its image line.",
                section="Retention",
            ),
            "deprecate_grace": Param(
                defn.deprecate,
                type="integer",
                minimum=defaults.DEPRECATE_GRACE_RANGE[0],
                maximum=defaults.DEPRECATE_GRACE_RANGE[1],
                title="AMIs to deprecate",
                description="The next this many are deprecated (deprecate_at) instead of deregistered.",
                section="Retention",
            ),
        },
    ) as dag:

        @task(multiple_outputs=True, retries=0, execution_timeout=timedelta(minutes=2))
        def validate_params(params: dict | None = None) -> dict:
            """Check every value before anything is created; the error names the field."""
            from operators.base import settings
            from operators.rules.validation import refuse_undeclared, validate_image_build

            refuse_undeclared(params or {})  # conf keys the form does not declare (instance profile ...)
            # the definition as the file is now, this run's overrides checked the same way
            return validate_image_build(definition.load(defn.path), params or {}, settings()).as_dict()

        p = validate_params()
        # read-only and DryRun calls only: nothing is launched unless the night can succeed
        preflight = Preflight(
            task_id="preflight",
            recipe=p["recipe"],
            build=p,
            execution_timeout=timedelta(minutes=10),
            **AWS_STEP,
        )

        # from the worker, no box: a night whose inputs are the newest verified AMI's skips the rest
        inputs = FingerprintInputs(
            task_id="fingerprint_inputs",
            recipe=p["recipe"],
            build=p,
            runs_anyway=["distribute_ami"],
            execution_timeout=timedelta(minutes=10),
            **AWS_STEP,
        )
        launch = LaunchBuildBox(
            task_id="launch_build_box",
            recipe=p["recipe"],
            instance_type=p["instance_type"],
            subnet_id=p["subnet_id"],
            base_ami=p["base_ami"],
            base_ami_owner=p["base_ami_owner"],
            base_ami_name=p["base_ami_name"],
            instance_profile=p["instance_profile"],
            execution_timeout=timedelta(minutes=45),
            **AWS_STEP,
        )
        attach = AttachCanvas(
            task_id="attach_canvas",
            recipe=p["recipe"],
            box=launch.output,
            size_gib=p["canvas_size_gib"],
            device_name=p["device_name"],
            encrypted=p["encrypted"],
            kms_key_id=p["kms_key_id"],
            **AWS_STEP,
        )
        build = RemoteChrootBuild(
            task_id="remote_chroot_build",
            recipe=p["recipe"],
            box=launch.output,
            canvas=attach.output,
            image=p["image"],
            mirror_url=p["mirror_url"],
            boot_check=p["boot_check"],
            build_timeout=defaults.BUILD_TIMEOUT_S,
            # an OS build failure is rarely transient: fail fast and show the phase; retry by hand
            retries=0,
            execution_timeout=timedelta(seconds=defaults.BUILD_TIMEOUT_S + 600),
        )
        snapshot = FrozenSnapshot(
            task_id="frozen_snapshot",
            recipe=p["recipe"],
            box=launch.output,
            canvas=attach.output,
            execution_timeout=_wait_budget(defaults.WAIT_SNAPSHOT_COMPLETED),
            **AWS_STEP,
        )
        register = RegisterHVMAmi(
            task_id="register_hvm_ami",
            recipe=p["recipe"],
            image=p["image"],
            snapshot=snapshot.output,
            size_gib=p["canvas_size_gib"],
            ami_name_prefix=p["ami_name_prefix"],
            inputs=inputs.output,
            execution_timeout=_wait_budget(defaults.WAIT_IMAGE_AVAILABLE),
            **AWS_STEP,
        )
        manifest = PublishManifest(
            task_id="publish_manifest",
            recipe=p["recipe"],
            image=p["image"],
            ami=register.output,
            build=build.output,
            execution_timeout=timedelta(minutes=15),
            **AWS_STEP,
        )
        smoke = SmokeInstance(
            task_id="smoke_instance",
            recipe=p["recipe"],
            ami=register.output,
            build=build.output,
            box=launch.output,
            instance_type=p["smoke_instance_type"],
            smoke_check=p["smoke_check"],
            # a blocking wait (the login key lives only in the task's memory) + login + instance-check
            execution_timeout=_wait_budget(defaults.WAIT_INSTANCE_STATUS_OK)
            + timedelta(seconds=2 * defaults.SMOKE_CHECK_TIMEOUT_S),
            **AWS_STEP,
        )
        # the newest verified AMI: this night's once its smoke instance passed, else (nothing to build,
        # or smoke_check off) the one the fingerprint found; so a night with nothing to build still
        # finishes a distribution an earlier night left incomplete, or adds a region or account
        distribute = DistributeAmi(
            task_id="distribute_ami",
            recipe=p["recipe"],
            ami_id="{{ (ti.xcom_pull(task_ids='smoke_instance') or {}).get('ami_id') "
            "or ti.xcom_pull(task_ids='fingerprint_inputs')['newest_verified_ami'] }}",
            distribution=p["distribution"],
            trigger_rule="none_failed_min_one_success",
            execution_timeout=_wait_budget(defaults.WAIT_IMAGE_AVAILABLE),
            **AWS_STEP,
        )
        rotate = RotateAmis(
            task_id="rotate_amis",
            recipe=p["recipe"],
            new_ami_id="{{ ti.xcom_pull(task_ids='register_hvm_ami')['ami_id'] }}",
            keep=p["keep_amis"],
            grace=p["deprecate_grace"],
            distribution=p["distribution"],
            execution_timeout=timedelta(minutes=15),
            **AWS_STEP,
        )
        terminate_smoke = TerminateSmokeInstance(task_id="terminate_smoke_instance", **AWS_STEP)
        terminate = TerminateBuildBox(task_id="terminate_build_box", **AWS_STEP)
        delete_canvas = DeleteCanvas(task_id="delete_canvas", **AWS_STEP)

        preflight >> inputs >> launch >> attach >> build >> snapshot >> register >> smoke
        register >> manifest
        [inputs, manifest, smoke] >> distribute
        smoke >> terminate_smoke >> terminate >> delete_canvas
        smoke >> rotate  # only after the new AMI is available and verified; a failed night rotates nothing
        # finds the smoke instance by tags, whether the smoke task passed, failed or never ran; the
        # security group it sits in is deleted only after it (terminate_build_box is downstream)
        terminate_smoke.as_teardown(setups=launch)
        terminate.as_teardown(setups=launch)
        # runs when the box was launched even if attaching failed: it finds the canvas by tags
        delete_canvas.as_teardown(setups=[launch, attach])
    return dag


def broken_definition_dag(path: Path, error: definition.DefinitionError) -> DAG:
    """A definition that failed validation, shown in the UI instead of taken silently away.

    Same id as the good definition would have, no schedule, the error as description and doc, and one
    task that fails with it when triggered: the other definitions' DAGs parse and run as usual.
    """
    with DAG(
        dag_id=definition.dag_id(re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)),
        description=f"BROKEN DEFINITION {error}",
        doc_md=f"### Broken image definition\n\n`{error}`\n\nFix the file; this DAG becomes the image's "
        "nightly rebuild on the next parse.",
        schedule=None,
        catchup=False,
        tags=["amibake", "broken-definition"],
        default_args={"owner": "amibake", "retries": 0},
    ) as dag:

        @task(task_id="definition_error")
        def definition_error() -> None:
            """Fail with the file's error as it is now: nothing is built from a broken definition."""
            definition.load(path)
            raise RuntimeError(f"{path} is valid now; the DAG becomes its rebuild on the next parse")

        definition_error()
    return dag


for _path in definition.discover(defaults.images_dir()):
    try:
        _dag = image_dag(definition.load(_path))
    except definition.DefinitionError as _error:
        _dag = broken_definition_dag(_path, _error)
    globals()[_dag.dag_id] = _dag
