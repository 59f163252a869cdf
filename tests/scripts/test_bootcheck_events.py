"""The boot check's progress events, from the bash that emits them to the task log that shows them.

lib/bootcheck.sh emits one ``boot-stage`` event per boot stage and one ``check`` event per
instance-check item, on the progress pipe run_phase hands the phase as fd 4. These tests run those
very functions in bash and feed their stdout to the Airflow side's parser (BuildProgress) and logger
(operators.hooks.box._emit), so a renamed event or field breaks here, not at night.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from pathlib import Path

import pytest

from operators.hooks.box import CommandResult, _emit

SCRIPTS = Path(__file__).resolve().parents[2] / "include" / "scripts"


def bootcheck_bash(body: str) -> list[str]:
    """Run BODY in bash with build-image's libraries loaded and fd 4 = stdout; the output lines."""
    script = f"""
set -euo pipefail
. {SCRIPTS}/contract.env
. {SCRIPTS}/lib/common.sh
. {SCRIPTS}/lib/bootcheck.sh
{body}
"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.splitlines()


def test_check_items_reach_the_task_log(caplog: pytest.LogCaptureFixture) -> None:
    """PASS and "not applicable" items are logged as info, a FAIL as an error; all are recorded."""
    lines = bootcheck_bash("""
check_item cloud-init PASS "done without errors, datasource 'DataSourceEc2Local'" 4>&1 >/dev/null
check_item selinux-labels "not applicable" "EL7 only (debian image: no SELinux policy)" 4>&1 >/dev/null
check_item root-grew FAIL "partition nvme0n1p2 3071 MiB ends 2048 MiB before the end" 4>&1 >/dev/null
""")
    result = CommandResult(exit_code=None)
    with caplog.at_level(logging.INFO):
        for line in lines:
            _emit(line, result, logging.getLogger("test"))
    progress = result.progress
    assert progress.checks == {
        "cloud-init": ("PASS", "done without errors, datasource 'DataSourceEc2Local'"),
        "selinux-labels": ("not applicable", "EL7 only (debian image: no SELinux policy)"),
        "root-grew": ("FAIL", "partition nvme0n1p2 3071 MiB ends 2048 MiB before the end"),
    }
    assert progress.failed_checks == ["root-grew"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "boot check: root-grew: FAIL: partition nvme0n1p2 3071 MiB ends 2048 MiB before the end"
    ]
    assert "boot check: selinux-labels: not applicable: EL7 only" in caplog.text
    assert "failed checks: root-grew" in progress.failure(1)


def test_check_item_also_writes_the_phase_log_line() -> None:
    """The same item is one line in the phase log (stdout of the phase), in instance-check's format."""
    detail = "kernel panic (console: Kernel panic - not syncing)"
    lines = bootcheck_bash(f"check_item boot FAIL {shlex.quote(detail)} 4>/dev/null")
    assert lines == ["amibake-check: boot: FAIL: kernel panic (console: Kernel panic - not syncing)"]


def test_boot_stages_with_seconds(caplog: pytest.LogCaptureFixture) -> None:
    """Each stage reports its own seconds and the time since qemu started."""
    lines = bootcheck_bash("""
STAGE_T0=$(now); STAGE_LAST=$STAGE_T0
sleep 0.3; stage_done firmware 4>&1 >/dev/null
sleep 0.2; stage_done kernel 4>&1 >/dev/null
""")
    result = CommandResult(exit_code=None)
    with caplog.at_level(logging.INFO):
        for line in lines:
            _emit(line, result, logging.getLogger("test"))
    stages = result.progress.boot_stages
    assert list(stages) == ["firmware", "kernel"]
    assert 0.2 <= stages["firmware"] < 2 and 0.1 <= stages["kernel"] < 2
    assert "boot check: stage firmware took" in caplog.text


def test_a_json_special_detail_survives() -> None:
    """Quotes, backslashes and tabs in a detail (console lines) stay valid JSON."""
    detail = 'console: "root=/dev/loop0p2"\\ \tdone'
    lines = bootcheck_bash(f"check_item kernel-cmdline FAIL {shlex.quote(detail)} 4>&1 >/dev/null")
    result = CommandResult(exit_code=None)
    _emit(lines[0], result, logging.getLogger("test"))
    assert result.progress.checks["kernel-cmdline"] == ("FAIL", detail)
