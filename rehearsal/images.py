"""The rehearsal's customized Debian definition: every kind of customization, each effect checked on
the booted image by one of its own smoke checks.

``write_definition(folder, repo)`` writes ``folder/rehearsal-debian12.yaml`` and its sources: the
private, signed, password-protected repository of ``rehearsal.aptrepo`` (credentials through the
Airflow connection ``amibake_repo_rehearsal``), its package ``amibake-hello``, whose unit the
definition enables, a file with its own mode and group, a provisioning script that records the
environment it ran with, and a kernel argument. ``./rehearse``, tests/e2e and the Debian build test
use it; ``images_folder`` adds it next to the product's definitions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rehearsal.aptrepo import UNIT_MARKER, VERSION_FILE, AptRepo

NAME = "rehearsal-debian12"
CONNECTION_ID = "amibake_repo_rehearsal"
REPO_NAME = "rehearsal"
MOTD = "Built by amibake (rehearsal-debian12).\n"
MARKER = "/etc/amibake-provisioned"
KERNEL_ARG = "amibake.rehearsal=1"
#: The smoke checks: one per effect of the definition.
CHECKS = {
    "package": f"test -s {VERSION_FILE}",
    "service": f"systemctl is-active amibake-hello.service && test -s {UNIT_MARKER}",
    "file": "test \"$(stat -c '%a %U %G' /etc/motd)\" = '640 root adm' "
    "&& grep -qx 'Built by amibake (rehearsal-debian12).' /etc/motd",
    "script": f"grep -Eqx 'image={NAME} recipe=debian12 build=[0-9a-f]+' {MARKER}",
    "kernel-arg": f"grep -qw {KERNEL_ARG} /proc/cmdline",
}
SCRIPT = f"""#!/bin/sh
# rehearsal-debian12's provisioning script: runs inside the image while it is built
set -eu
printf 'image=%s recipe=%s build=%s\\n' "$AMIBAKE_IMAGE" "$AMIBAKE_RECIPE" "$AMIBAKE_BUILD_ID" >{MARKER}
"""


def definition(repo: AptRepo, mirror: str = "") -> dict:
    """The definition's fields, for the repository ``repo`` serves; ``mirror``: the Debian mirror
    (``rehearsal.mirror``; '' = the box's own apt sources, which a night cannot fingerprint)."""
    return {
        "name": NAME,
        "description": "Debian 12 with the rehearsal's private repository, a file, a script and a service",
        "recipe": "debian12",
        "size_gib": 4,
        **({"mirror": mirror} if mirror else {}),
        "repositories": [
            {
                "name": REPO_NAME,
                "base_url": repo.url,
                "suite": repo.suite,
                "components": list(repo.components),
                "gpg_key": f"{REPO_NAME}.asc",
                "gpg_fingerprint": repo.fingerprint,
                "connection_id": CONNECTION_ID,
            }
        ],
        "packages": {"install": [repo.package]},
        "files": [
            {"source": "motd", "destination": "/etc/motd", "mode": "0640", "owner": "root", "group": "adm"}
        ],
        "scripts": ["10-marker.sh"],
        "services": {"enable": [repo.unit]},
        "kernel_args": [KERNEL_ARG],
        "schedule": None,
        "smoke_checks": [{"name": name, "command": command} for name, command in CHECKS.items()],
    }


def write_definition(folder: Path, repo: AptRepo, mirror: str = "") -> Path:
    """``folder/rehearsal-debian12.yaml`` and ``folder/rehearsal-debian12/``; the definition's path."""
    sources = folder / NAME
    for sub in ("files", "scripts", "keys"):
        (sources / sub).mkdir(parents=True, exist_ok=True)
    (sources / "files" / "motd").write_text(MOTD)
    script = sources / "scripts" / "10-marker.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    shutil.copyfile(repo.key_file, sources / "keys" / f"{REPO_NAME}.asc")
    path = folder / f"{NAME}.yaml"
    path.write_text(
        "# Written by rehearsal/images.py for this run: the repository's URL and key change every run.\n"
        + yaml.safe_dump(definition(repo, mirror), sort_keys=False, width=200)
    )
    return path


def images_folder(dest: Path, product_images: Path, repo: AptRepo, mirror: str = "") -> Path:
    """``dest``: the product's definitions (``images/*.yaml`` and their folders) plus this one."""
    shutil.copytree(product_images, dest, ignore=shutil.ignore_patterns("examples"), dirs_exist_ok=True)
    write_definition(dest, repo, mirror)
    return dest


def connection(user: str, password: str) -> str:
    """The Airflow connection (``AIRFLOW_CONN_AMIBAKE_REPO_REHEARSAL`` JSON) with the repository login."""
    return json.dumps({"conn_type": "http", "login": user, "password": password})
