"""Defaults of amibake: connection ids, recipes, sizes, timeouts, and the ``[amibake]`` settings.

One place for every default value. Environment specifics (which connections, which SSH address,
which CIDR may reach the box, the schedule) are read from Airflow configuration section
``[amibake]`` (env ``AIRFLOW__AMIBAKE__<KEY>``) by :func:`setting`, so the same DAG runs against
AWS and the offline rehearsal without code edits. The facts the box checks too are the contract's
(``include/scripts/contract.env``, read once at import); importing does no other I/O.
"""

from __future__ import annotations

from pathlib import Path

from operators.rules.contract import CONTRACT

CONFIG_SECTION = "amibake"

# -- connections ---------------------------------------------------------------------------------
AWS_CONN_ID = "amibake_aws"
SSH_CONN_ID = "amibake_ssh"

# -- recipes and the build box -------------------------------------------------------------------
# Facts the box checks too come from include/scripts/contract.env (operators/rules/contract.py).
RECIPES = CONTRACT.recipes
DEFAULT_RECIPE = CONTRACT.recipe_default
DEFAULT_INSTANCE_TYPE = "t3.medium"
#: Newest AMI matching this owner + name is the default base of the build box: an EL7 box builds
#: an EL7 image best (rpm database format, mkfs.xfs defaults). 125523088429 = the CentOS project.
DEFAULT_BASE_AMI_OWNER = "125523088429"
DEFAULT_BASE_AMI_NAME = "CentOS Linux 7 x86_64*"

# -- the canvas volume ---------------------------------------------------------------------------
DEFAULT_CANVAS_SIZE_GIB = 8
CANVAS_SIZE_MIN_GIB = CONTRACT.canvas_size_min_gib
CANVAS_SIZE_MAX_GIB = CONTRACT.canvas_size_max_gib
DEFAULT_CANVAS_DEVICE = CONTRACT.device_name_default
CANVAS_VOLUME_TYPE = "gp3"

# -- the image -----------------------------------------------------------------------------------
ROOT_DEVICE_NAME = "/dev/sda1"
ROOT_VOLUME_TYPE = "gp3"
BOOT_MODE = "legacy-bios"
IMDS_SUPPORT = "v2.0"
SRIOV_NET_SUPPORT = "simple"
ARCHITECTURE = "x86_64"
ASSET_ALIAS = "amibake-ami"

# -- the smoke instance (after registration) -------------------------------------------------------
DEFAULT_SMOKE_INSTANCE_TYPE = "t3.micro"
#: Its root volume is the AMI's size plus this much, so growpart has work to do (as in the boot check).
SMOKE_EXTRA_GIB = 2
#: Hard limit of instance-check over SSH (its cloud-init item alone may wait up to 900 s).
SMOKE_CHECK_TIMEOUT_S = 20 * 60
#: Lines of the console output put in the task log when the smoke check failed.
CONSOLE_TAIL_LINES = 80

# -- AMI rotation (after a new AMI is available) ---------------------------------------------------
#: keep the newest N AMIs of a recipe, set deprecate_at on the next M, deregister the rest
DEFAULT_KEEP_AMIS = 3
KEEP_AMIS_RANGE = (1, 100)
DEFAULT_DEPRECATE_GRACE = 2
DEPRECATE_GRACE_RANGE = (0, 100)


def default_ami_prefix(image: str) -> str:
    """AMI name prefix used when the user gives none: one image line per image definition."""
    return f"amibake-{image}"


def asset_uri(image: str) -> str:
    """URI of the Airflow Asset announcing a new AMI of one image definition."""
    return f"amibake://ami/{image}"


# -- the box side --------------------------------------------------------------------------------
#: Scripts shipped to the box; overridable with ``[amibake] scripts_dir``.
PACKAGE_SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "include" / "scripts"
#: Image definitions; overridable with ``[amibake] images_dir``.
PACKAGE_IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
BUILD_ENTRY_POINT = "build-image"
#: The box thaws a frozen canvas by itself after this many seconds if nobody calls ``thaw``.
FREEZE_TIMEOUT_S = CONTRACT.freeze_timeout_s

# -- timeouts and waits --------------------------------------------------------------------------
BUILD_TIMEOUT_S = 3 * 3600
SSH_READY_TIMEOUT_S = 15 * 60
SSH_CONNECT_TIMEOUT_S = 10
SSH_POLL_INTERVAL_S = 10
#: (delay seconds, max attempts) of each deferrable or blocking wait. Generous on purpose:
#: snapshots and AMIs take 30+ minutes on AWS, and a too-short wait fails a build that succeeded.
WAIT_INSTANCE_RUNNING = (15, 80)  # 20 min
WAIT_INSTANCE_TERMINATED = (15, 80)  # 20 min
WAIT_VOLUME_IN_USE = (5, 120)  # 10 min
WAIT_VOLUME_AVAILABLE = (5, 120)  # 10 min
WAIT_SNAPSHOT_COMPLETED = (30, 360)  # 3 h
WAIT_IMAGE_AVAILABLE = (30, 360)  # 3 h
#: the smoke instance's status checks (2/2 ok: EC2's reachability and the OS's own)
WAIT_INSTANCE_STATUS_OK = (15, 60)  # 15 min
#: (longest pause s, attempts) of a lookup of a resource just created, which EC2 may not know yet:
#: pauses 0.5, 1, 2, 4, 8, 8 ... s (about 45 s in all)
NEW_RESOURCE_RETRIES = (8, 10)
SG_DELETE_ATTEMPTS = (10, 60)  # (longest pause s, attempts): a terminated box's interface lingers a while

# -- the ``[amibake]`` settings ------------------------------------------------------------------
SSH_ADDRESSES = ("public_ip", "private_ip", "connection")
SETTINGS: dict[str, str] = {
    # how the worker reaches the box: its public or private IP, or the SSH connection's own
    # host/port (an SSM/bastion tunnel on AWS; this machine in the offline rehearsal)
    "ssh_address": "public_ip",
    # CIDR admitted to tcp/22 of the build box; no default: never 0.0.0.0/0 unless set so
    "ssh_cidr": "",
    "schedule": "0 2 * * *",
    "aws_conn_id": AWS_CONN_ID,
    "ssh_conn_id": SSH_CONN_ID,
    "subnet_id": "",
    "instance_profile": "",
    # encrypt the canvas, and so the snapshot and the AMI (false only for AMIs you make public)
    "encrypted": "true",
    "kms_key_id": "",
    # the default of the boot_check Param: boot the image as EC2 does before registering it. An EL7
    # box cannot (its qemu-kvm 1.5.3 has no NVMe, no q35): CentOS 7 nights fail at the box's tools
    # phase until this is "false" (the image is then registered unbooted, and the task log says so)
    "boot_check": "true",
    # the default of the smoke_check Param: launch one instance of the new AMI, check its first boot
    # over SSH, and only then tag it verified (rotation counts verified AMIs only). "false" registers
    # AMIs unverified (the task log says so); the smoke task and rotation are skipped.
    "smoke_check": "true",
    # the default of the smoke_instance_type Param: the instance type of that smoke instance
    "smoke_instance_type": DEFAULT_SMOKE_INSTANCE_TYPE,
    "scripts_dir": "",
    # the image definitions (images/<name>.yaml): one DAG amibake_<name> each; empty = the package's
    "images_dir": "",
    # failure and deadline notifications: dotted path of an Airflow notifier class (any provider's,
    # e.g. airflow.providers.smtp.notifications.smtp.SmtpNotifier) and its keyword arguments as JSON
    "notifier": "",
    "notifier_kwargs": "",  # empty = no arguments
    # an S3 bucket (the amibake_aws connection's account) for each AMI's package list and CycloneDX
    # SBOM: s3://<bucket>/<image line>/<ami id>/packages.json and sbom.cdx.json; empty = none (the
    # list then stays in the build task's XCom, and the AMI's tags carry its sha256)
    "manifest_bucket": "",
}


def setting(key: str) -> str:
    """One ``[amibake]`` setting from Airflow configuration, or its default above."""
    if key not in SETTINGS:
        raise KeyError(f"unknown [amibake] setting {key!r}")
    from airflow.sdk import conf

    return conf.get(CONFIG_SECTION, key, fallback=SETTINGS[key]).strip()


def images_dir() -> Path:
    """The folder of image definitions (``images/*.yaml``) the DAG file turns into DAGs."""
    configured = setting("images_dir")
    return Path(configured) if configured else PACKAGE_IMAGES_DIR


def scripts_dir() -> Path:
    """The local ``include/scripts`` directory shipped to the box."""
    configured = setting("scripts_dir")
    return Path(configured) if configured else PACKAGE_SCRIPTS_DIR
