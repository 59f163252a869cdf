"""One contract, two readers: include/scripts/contract.env as bash and Python read it, and the same
verdict from both sides' real checks (build-image's CLI, the security boundary, and the Python rules
the DAG applies before anything is created) for the same good and bad values. No root needed."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from loopdisk import BUILD_IMAGE

from operators.rules import contract
from operators.rules.contract import CONTRACT, Contract, ContractError
from operators.rules.remote import build_image_argv
from operators.rules.validation import ParamError

SCRIPTS = BUILD_IMAGE.parent
CONTRACT_ENV = SCRIPTS / "contract.env"
VOL = "vol-0123456789abcdef0"


def bash(code: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """bash code with contract.env and lib/common.sh sourced, under build-image's locale."""
    prelude = f'set -euo pipefail; export LC_ALL=C; . "{CONTRACT_ENV}"; . "{SCRIPTS}/lib/common.sh";'
    return subprocess.run(["bash", "-c", f"{prelude} {code}"], input=stdin, capture_output=True, text=True,
                          check=True)


def test_both_sides_read_the_same_values() -> None:
    """Every key, as bash sees it after sourcing, equals what Python parsed; no key is left unread."""
    keys = [f.upper() for f in Contract.__dataclass_fields__]
    out = bash("for k in " + " ".join(keys) + '; do printf "%s=%s\\0" "$k" "${!k}"; done').stdout
    from_bash = dict(item.split("=", 1) for item in out.split("\0") if item)
    assert from_bash == contract.parse(CONTRACT_ENV.read_text())
    assert set(from_bash) == set(keys)


def test_python_reads_the_file_the_scripts_ship() -> None:
    """operators/rules/contract.env is the scripts' file (a link here, a copy in the wheel)."""
    assert contract.CONTRACT_FILE.resolve().samefile(CONTRACT_ENV)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("VOLUME_ID_RE=^vol-$\n", "not KEY='value'"),
        ("VOLUME_ID_RE='a'\nVOLUME_ID_RE='b'\n", "given twice"),
        ("EXTRA='x'\n", "unknown keys ['EXTRA']"),
        ("VOLUME_ID_RE='^vol-\\d+$'\n", "only the regex subset"),
        ("CANVAS_SIZE_MIN_GIB='one'\n", "not a whole number"),
    ],
)
def test_a_bad_contract_fails_loudly(tmp_path: Path, text: str, error: str) -> None:
    """A malformed line, a duplicate, an unknown or missing key, a regex outside the shared subset."""
    key = text.split("=")[0]
    lines = [ln for ln in CONTRACT_ENV.read_text().splitlines() if not ln.startswith(key + "=")]
    bad = tmp_path / "contract.env"
    bad.write_text("\n".join(lines) + "\n" + text)
    with pytest.raises(ContractError, match=error.replace("[", r"\[").replace("]", r"\]")):
        contract.load(bad)


# Strings each pattern of the contract must judge alike in bash ERE (LC_ALL=C, as build-image runs)
# and Python re.fullmatch.
CORPUS = [
    "", "vol-0123abcd", "vol-0123456789abcdef0", "vol-0123456789abcdef", "vol-0123456789ABCDEF0",
    "vol-0123456789abcdef0\n", " vol-0123abcd", "vol-0123456789abcdef01", "vol-١٢٣٤٥٦٧٨",
    "ami-0123abcd", "ami-0123456789abcdef0", "ami-0123456789", "ami-0123456789abcdef0;reboot",
    "/dev/sdf", "/dev/sdp", "/dev/xvdf", "/dev/xvdp", "/dev/sda", "/dev/sde", "/dev/sdq", "/dev/sdz",
    "/dev/sdF", "/dev/sdf1", "/dev/nvme1n1", "/dev/sdf\n",
    "0", "1", "8", "08", "000008", "0000008", "16384", " 8", "+8", "8.0", "1_000", "٨",
    "http://a", "https://vault.centos.org/7.9.2009", "http://127.0.0.1:8080/debian/", "http://h:99999/x",
    "https://mirror.example.org/centos/7.9.2009/", "https://u:p@host/x", "https://host/x?y=1",
    "https://host/x#f", "https://host/a=b", "file:///srv", "ftp://host/x", "http://host/$(reboot)",
    "http://host/`id`", "http://-host/x", "http://host./x", "http://host/a b", "http://host/%20~+_.-",
    "https://host/x\n", "HTTP://host/x", "http://hoßt/x", "http://[::1]/x",
]
PATTERNS = [f.name for f in contract.fields(Contract) if f.name.endswith("_re")]


def test_every_pattern_judges_alike_in_bash_and_python() -> None:
    """bash [[ =~ ]] and Python re agree on every contract pattern for every corpus string."""
    regex_vars = " ".join(p.upper() for p in PATTERNS)
    code = (
        "while IFS= read -r -d '' s; do for v in " + regex_vars + "; do "
        'if [[ $s =~ ${!v} ]]; then printf 1; else printf 0; fi; done; printf "\\n"; done'
    )
    rows = bash(code, stdin="".join(s + "\0" for s in CORPUS)).stdout.splitlines()
    assert len(rows) == len(CORPUS)
    for text, row in zip(CORPUS, rows, strict=True):
        for name, bit in zip(PATTERNS, row, strict=True):
            python = bool(getattr(CONTRACT, name).fullmatch(text))
            assert python == (bit == "1"), f"{name} on {text!r}: python {python}, bash {bit == '1'}"


def cli_refuses(option: str, value: str) -> bool:
    """Does build-image's own option check refuse VALUE for OPTION? (It never gets to run anything:
    a good value ends at the unknown phase instead.)"""
    args = ["--recipe", "debian12", "--volume-id", VOL, "--size-gib", "8", "--work-dir", "/nonexistent/w"]
    idx = args.index(option) + 1 if option in args else None
    if idx:
        args[idx] = value
    else:
        args += [option, value]
    proc = subprocess.run(["bash", str(BUILD_IMAGE), *args, "no-such-phase"], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout == ""
    if f"{option}: " in proc.stderr:
        return True
    assert "unknown phase 'no-such-phase'" in proc.stderr, proc.stderr
    return False


BASE = {"build": "0123456789ab", "action": "all", "volume_id": VOL, "recipe": "debian12",
        "device_name": "/dev/sdf", "size_gib": 8}
PYTHON_SIDE: dict[str, Callable[[str], object]] = {
    "--volume-id": lambda v: build_image_argv(**{**BASE, "volume_id": v}),
    "--device-name": lambda v: build_image_argv(**{**BASE, "device_name": v}),
    "--size-gib": lambda v: build_image_argv(**{**BASE, "size_gib": v}),
    "--mirror": lambda v: build_image_argv(**{**BASE, "mirror_url": v}),
    "--recipe": lambda v: build_image_argv(**{**BASE, "recipe": v}),
    "--freeze-timeout": lambda v: build_image_argv(**{**BASE, "action": "freeze", "freeze_timeout": v}),
}
VALUES = {
    "--volume-id": ["vol-0123abcd", VOL, "vol-0123456789", "vol-0123456789ABCDEF0", "vol-1;reboot",
                    "vol-0123456789abcdef0\n", "i-0123456789abcdef0"],
    "--device-name": ["/dev/sdf", "/dev/sdp", "/dev/xvdf", "/dev/xvdk", "/dev/sdb", "/dev/sde", "/dev/sdq",
                      "/dev/xvdz", "/dev/sda1", "../../etc/passwd", "/dev/nvme1n1"],
    "--size-gib": ["1", "8", "16384", "0", "16385", "08", "0000008", " 8", "+8", "8.0", "eight", "1_000"],
    "--mirror": ["http://a", "https://vault.centos.org/7.9.2009", "http://127.0.0.1:8080/debian/",
                 "https://mirror.example.org/centos/%37.9/", "https://u:p@host/x", "https://token@host/x",
                 "https://host/x?y", "https://host/x#f", "https://host/a=b", "file:///srv/mirror",
                 "ftp://host/x", "http://host/$(reboot)", "http://host/a b", "http://host/x\n",
                 "javascript:alert(1)", "http://", "http://host:1234", "https://" + "a" * 2040,
                 "https://" + "a" * 2041],
    "--recipe": ["centos7", "debian12", "ubuntu", "centos7 ", "CENTOS7", ""],
    "--freeze-timeout": ["1", "300", "3600", "0", "3601", "60s", "-5", "300\n"],
}


@pytest.mark.parametrize("option", list(VALUES))
def test_same_verdict_on_both_sides(option: str) -> None:
    """The Python rules and build-image's own check accept and refuse exactly the same values."""
    verdicts = set()
    for value in VALUES[option]:
        try:
            PYTHON_SIDE[option](value)
            python_refuses = False
        except ParamError:
            python_refuses = True
        bash_refuses = cli_refuses(option, value)
        assert python_refuses == bash_refuses, (option, value, python_refuses)
        verdicts.add(bash_refuses)
    assert verdicts == {True, False}, "the values must hold good and bad ones"


def test_nitro_link_rule_is_one_rule() -> None:
    """The by-id link: bash's byid_link, the Python rule and the rehearsal's EBS emulator agree."""
    from rehearsal.ebs import link_path

    out = bash(f'. "{SCRIPTS}/lib/device.sh"; byid_link {VOL}').stdout.strip()
    assert out == CONTRACT.nvme_byid_link(VOL) == str(link_path(VOL))
    assert out == "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"


def test_default_work_dir_is_the_contract_box_dir() -> None:
    """Without --work-dir, build-image works in BOX_WORK_DIR/<volume-id> (where the operator looks)."""
    vol = "vol-0ffffffffffffff0f"
    work = Path(CONTRACT.box_work_dir) / vol
    assert not work.exists()
    try:
        subprocess.run(["bash", str(BUILD_IMAGE), "--recipe", "debian12", "--volume-id", vol, "tools"],
                       capture_output=True, text=True, timeout=60)
        assert (work / "logs" / "tools.log").is_file()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_help_names_the_contract_recipes_and_default_device() -> None:
    """--help is written from the contract: the recipes and the default device name."""
    cmd = ["bash", str(BUILD_IMAGE), "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"--recipe {'|'.join(CONTRACT.recipes)}" in out
    assert f"--device-name {CONTRACT.device_name_default}" in out
