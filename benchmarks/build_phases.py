"""Time of each phase of a Debian 12 image build on this machine, as build-image reports it.

A sparse file on a loop device, registered under a fresh volume id exactly as the offline rehearsal
does, is built with ``build-image --recipe debian12 ... all --boot-check`` and the seconds of every
``phase-end`` progress line are printed as a table, with the wall time of the whole run.

Usage (root)::

    .venv/bin/python benchmarks/build_phases.py             # full build + qemu boot check (~2 min)
    .venv/bin/python benchmarks/build_phases.py --smoke     # disk phases only (seconds)
    .venv/bin/python benchmarks/build_phases.py --runs 2    # repeat, print each run and the median

The offline package cache (``$AMIBAKE_PACKAGE_CACHE``, default .cache/packages) keeps downloaded
packages between runs; pass --no-cache to time the downloads too. This prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "scripts")]

from loopdisk import LoopVolume, run_build  # noqa: E402

from rehearsal.sshd import package_cache, package_cache_env  # noqa: E402

SMOKE_PHASES = ["resolve", "partition", "mkfs", "mount", "umount"]


def one_run(smoke: bool, size_gib: int, cache: Path | None) -> dict[str, float]:
    """Build once on a fresh loop canvas; phase -> seconds, plus 'wall'. Always cleans up."""
    vol = LoopVolume(size_gib=size_gib)
    env = package_cache_env(cache)
    args = SMOKE_PHASES if smoke else ["--boot-check", "--boot-timeout", "900", "all"]
    try:
        t0 = time.monotonic()
        res = run_build(vol, *args, env=env, timeout=3600)
        wall = time.monotonic() - t0
        if res.rc != 0:
            tail = "\n".join(res.other_stdout[-40:])
            raise SystemExit(f"build failed (rc {res.rc}): {res.stderr.strip()}\n{tail}")
        times = {e["phase"]: float(e["seconds"]) for e in res.events if e["event"] == "phase-end"}
        times["wall"] = wall
        return times
    finally:
        vol.teardown()


def main() -> None:
    """Parse options, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="disk phases only: resolve..mount, umount")
    parser.add_argument("--runs", type=int, default=1, help="number of builds (default 1)")
    parser.add_argument("--size-gib", type=int, default=3, help="canvas size (default 3)")
    parser.add_argument("--no-cache", action="store_true", help="download every package")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: loop devices and mounts")
    cache = None if opts.no_cache else package_cache()
    runs = [one_run(opts.smoke, opts.size_gib, cache) for _ in range(opts.runs)]
    phases = list(runs[0])
    kind = "smoke (disk phases)" if opts.smoke else "debian12 all --boot-check"
    print(f"build-image {kind}, {opts.size_gib} GiB loop canvas, package cache: {cache or 'none'}")
    header = f"{'phase':<12}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs)))
    if len(runs) > 1:
        header += f"{'median':>10}"
    print(header)
    for phase in phases:
        values = [r.get(phase, float("nan")) for r in runs]
        line = f"{phase:<12}" + "".join(f"{v:>10.1f}" for v in values)
        if len(runs) > 1:
            line += f"{statistics.median(values):>10.1f}"
        print(line)
    phase_sum = [sum(v for k, v in r.items() if k != "wall") for r in runs]
    line = f"{'sum phases':<12}" + "".join(f"{v:>10.1f}" for v in phase_sum)
    if len(runs) > 1:
        line += f"{statistics.median(phase_sum):>10.1f}"
    print(line)


if __name__ == "__main__":
    main()
