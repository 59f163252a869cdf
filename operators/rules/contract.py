"""The contract between the Airflow side and the box scripts, read from ``include/scripts/contract.env``.

One home for every fact both sides check or emit (id patterns, device names, canvas size range,
mirror URL rule, recipes, box work directory, freeze timeout, progress-line prefix and events, the
Nitro by-id link rule). ``build-image`` sources the same file; this module parses it strictly
(``KEY='value'`` lines only, exactly the keys of :class:`Contract`), so a malformed or incomplete
contract fails at import instead of letting the two sides drift. Pure: no Airflow import.

``contract.env`` next to this module is a link to the scripts' file in a checkout and a copy of it
in an installed package (``package-data``), so the product image needs no checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

CONTRACT_FILE = Path(__file__).with_name("contract.env")
_LINE_RE = re.compile(r"([A-Z][A-Z0-9_]*)='([^']*)'")


class ContractError(ValueError):
    """contract.env is malformed, lacks a key or has one this module does not know."""


@dataclass(frozen=True)
class Contract:
    """The parsed contract; field names are the lower-cased keys of contract.env."""

    uint_re: re.Pattern[str]
    volume_id_re: re.Pattern[str]
    ami_id_re: re.Pattern[str]
    device_name_re: re.Pattern[str]
    device_name_default: str
    canvas_size_min_gib: int
    canvas_size_max_gib: int
    nvme_byid_dir: str
    nvme_byid_prefix: str
    mirror_url_re: re.Pattern[str]
    mirror_url_max: int
    debian_security_suffix: str
    recipes: tuple[str, ...]
    recipe_default: str
    box_work_dir: str
    freeze_timeout_s: int
    freeze_timeout_min_s: int
    freeze_timeout_max_s: int
    progress_prefix: str
    progress_events: tuple[str, ...]
    result_statuses: tuple[str, ...]
    image_name_re: re.Pattern[str]
    package_name_re: re.Pattern[str]
    repo_name_re: re.Pattern[str]
    service_name_re: re.Pattern[str]
    kernel_arg_re: re.Pattern[str]
    image_path_re: re.Pattern[str]
    image_path_forbidden: tuple[str, ...]
    bundle_path_re: re.Pattern[str]
    file_mode_re: re.Pattern[str]
    owner_re: re.Pattern[str]
    gpg_fingerprint_re: re.Pattern[str]
    image_file_max_bytes: int
    image_bundle_max_bytes: int
    provision_timeout_s: int
    packages_file: str
    package_epoch_re: re.Pattern[str]
    package_version_re: re.Pattern[str]
    package_release_re: re.Pattern[str]
    package_arch_re: re.Pattern[str]
    packages_max: int

    def nvme_byid_link(self, volume_id: str) -> str:
        """The ``/dev/disk/by-id`` link udev makes for an EBS volume on a Nitro instance."""
        if not self.volume_id_re.fullmatch(volume_id):
            raise ValueError(f"volume_id {volume_id!r} is not an EBS volume id")
        return f"{self.nvme_byid_dir}/{self.nvme_byid_prefix}{volume_id.replace('-', '')}"

    def event(self, name: str) -> str:
        """``name`` if it is a progress event of the contract (a typo fails at import, not at night)."""
        if name not in self.progress_events:
            raise ContractError(f"progress event {name!r} is not in contract.env PROGRESS_EVENTS")
        return name

    def status(self, name: str) -> str:
        """``name`` if it is a result status of the contract."""
        if name not in self.result_statuses:
            raise ContractError(f"result status {name!r} is not in contract.env RESULT_STATUSES")
        return name


def parse(text: str) -> dict[str, str]:
    """``KEY -> value`` of contract.env text; any other line is an error naming its number."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE_RE.fullmatch(line)
        if not match:
            raise ContractError(f"contract.env line {number}: not KEY='value': {line!r}")
        key, value = match.groups()
        if key in values:
            raise ContractError(f"contract.env line {number}: {key} given twice")
        values[key] = value
    return values


def _convert(kind: object, key: str, raw: str) -> object:
    """One raw value as the type its field declares."""
    if kind == "int":
        if not raw.isdigit():
            raise ContractError(f"contract.env {key}: {raw!r} is not a whole number")
        return int(raw)
    if kind == "tuple[str, ...]":
        return tuple(raw.split())
    if kind == "re.Pattern[str]":
        if "\\" in raw or "(?" in raw:
            raise ContractError(f"contract.env {key}: only the regex subset bash and Python share")
        return re.compile(raw)
    return raw


def load(path: Path = CONTRACT_FILE) -> Contract:
    """Read and check contract.env: every key of :class:`Contract`, nothing else."""
    values = parse(path.read_text())
    wanted = {f.name.upper(): f for f in fields(Contract)}
    missing, unknown = sorted(wanted.keys() - values.keys()), sorted(values.keys() - wanted.keys())
    if missing or unknown:
        raise ContractError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    return Contract(**{f.name: _convert(f.type, key, values[key]) for key, f in wanted.items()})


CONTRACT = load()
