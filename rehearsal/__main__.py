"""``python -m rehearsal`` (``./rehearse``): the whole nightly AMI rebuild, rehearsed on this machine.

It builds one image definition (``--image NAME``, DAG ``amibake_<NAME>``); by default
``rehearsal-debian12``, a customized Debian 12 (rehearsal/images.py) with a package from a private,
signed apt repository behind basic auth that the rehearsal serves on 127.0.0.1 for the run
(rehearsal/aptrepo.py; its login reaches Airflow as the connection ``amibake_repo_rehearsal``), a
file, a script, a service and a smoke check for each. The DAGs come from the rehearsal's own images
folder: the product's ``images/*.yaml`` plus that definition. After the run the repository's password
is searched for in XCom, the task instances' rendered fields, the recorded EC2 requests and every file
of the Airflow home (database, task logs) and of the rehearsal's logs: a hit fails the rehearsal.

Starts the local EC2 API (moto behind the recording proxy, own process; every instance it launches is
a real box: rehearsal.boxes), the EBS emulator (attached volumes become loop devices) and a real Airflow
(api-server, scheduler, dag-processor, triggerer; SQLite + LocalExecutor) with the connections
pointing at them. Then it unpauses the nightly DAG, triggers it through the REST API as the UI's
Trigger button does, prints which task is running, and ends with a summary. Everything it started
is stopped and removed at the end, on failure and on Ctrl-C; whatever a killed earlier run left
(processes, loop devices, mounts, links) is cleaned up first.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from operators import defaults
from operators.rules import definition
from operators.rules.naming import build_id
from operators.rules.validation import parse_conf_items
from rehearsal import images, leaks, processes
from rehearsal.airflow_env import (
    ADMIN_USER,
    MARKER_ENV,
    REHEARSAL_DIR,
    AirflowError,
    LocalAirflow,
    amibake_env,
    conn_env_var,
    rehearsal_settings,
)
from rehearsal.aptrepo import GNUPGHOME_PREFIX, AptRepo
from rehearsal.boxes import BOX_NETWORK, Boxes, Login, default_user
from rehearsal.ebs import EbsSnapshots, LoopEbs
from rehearsal.ec2_local import Ec2Control, LocalEc2, standard_extensions
from rehearsal.guests import Guests
from rehearsal.iam import POLICY_PATH, load_policy
from rehearsal.mirror import FrozenMirror, debian_upstreams
from rehearsal.sshd import WORK_DIR_PREFIX, package_cache, package_cache_env

#: The definition a plain ``./rehearse`` builds: every kind of customization, served by a local repo.
DEFAULT_IMAGE = images.NAME
DAG_ID = definition.dag_id(DEFAULT_IMAGE)
#: The login of the rehearsal's apt repository (the password is new for each run).
REPO_USER = "amibake"
#: The box is this machine, a Debian 12: cloud-init's default user of such an image is ``admin``.
BASE_IMAGE_NAME = "debian-12-amd64-amibake-rehearsal-base"
TERMINAL_STATES = {"success", "failed"}
STATE_FILE = "state.json"
#: The tasks whose return values carry the new AMI id and the snapshot id.
AMI_TASK = "register_hvm_ami"
SNAPSHOT_TASK = "frozen_snapshot"
INPUTS_TASK = "fingerprint_inputs"
SMOKE_TASK = "smoke_instance"
AMI_RE = re.compile(r"\bami-[0-9a-f]{8,17}\b")
SNAPSHOT_RE = re.compile(r"\bsnap-[0-9a-f]{8,17}\b")


class RehearsalError(RuntimeError):
    """The rehearsal could not run, or the DAG run failed."""


@dataclass
class RunResult:
    """What a rehearsal run produced, for the summary and the benchmarks."""

    run_id: str
    state: str
    wall_seconds: float
    tasks: list[dict[str, Any]]
    ami_id: str | None = None
    snapshot_id: str | None = None
    failed: list[str] = field(default_factory=list)
    log_tails: dict[str, str] = field(default_factory=dict)
    ec2_calls: list[dict[str, Any]] = field(default_factory=list)
    dag_id: str = DAG_ID
    #: where the repository password was found after the run (should be nowhere)
    leaks: list[str] = field(default_factory=list)
    #: what that search covered, for the summary
    scanned: list[str] = field(default_factory=list)
    #: the next night, triggered right after a green one with nothing changed (None: not run)
    unchanged: RunResult | None = None


@dataclass
class ServedRepo:
    """The rehearsal's apt repository for this run, with the login the build must use."""

    repo: AptRepo
    user: str
    password: str

    def needles(self) -> list[str]:
        """The password, and the Basic-auth token that carries it on the wire."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return [self.password, token]


def say(message: str) -> None:
    """Progress on stdout, flushed (the caller may be a pipe)."""
    print(message, flush=True)


# -- clean-up of earlier runs ------------------------------------------------------------------------
def _marked_processes(state_dir: Path) -> list[int]:
    """PIDs of processes started by a rehearsal in ``state_dir`` (they carry the marker variable)."""
    marker = f"{MARKER_ENV}={state_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _read_state(state_dir: Path) -> dict[str, Any]:
    """What the last harness in ``state_dir`` recorded (empty when it ended cleanly)."""
    state = state_dir / STATE_FILE
    return json.loads(state.read_text()) if state.exists() else {}


def _our_sessions(state_dir: Path) -> set[int]:
    """Sessions a rehearsal in ``state_dir`` started: those recorded in its state file, and those
    led by a process that carries the marker (in case it was killed before it could record them)."""
    recorded = processes.still_ours(tuple(s) for s in _read_state(state_dir).get("sessions", []))
    led = {pid for pid in _marked_processes(state_dir) if processes.session_id(pid) == pid}
    return (recorded | led) - {processes.session_id(os.getpid())}


def _rehearsal_processes(state_dir: Path) -> list[int]:
    """Every process of a rehearsal in ``state_dir``: its services with all they forked, and anything
    else that carries the marker."""
    return sorted(set(processes.members(_our_sessions(state_dir))) | set(_marked_processes(state_dir)))


def _is_harness(pid: int) -> bool:
    """Whether ``pid`` is a running rehearsal harness (its own environment lacks the marker,
    which it sets for its children only, so it is recognised by its command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return processes.running(pid) and pid != os.getpid() and b"rehearsal" in argv and b"-m" in argv


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for processes to exit; returns those still there."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if processes.running(p)]
    return alive


def _box_processes(ids: list[str]) -> list[int]:
    """Processes working for these builds / volumes (by command line), with all their descendants.

    A box ends its build when it is terminated or dies with the local EC2 API; this is the last
    resort for a run killed in between.
    """
    needles = [i.encode() for i in ids if i]
    parent: dict[int, int] = {}
    roots = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if any(n in cmdline for n in needles):
            roots.add(int(proc.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, ppid in parent.items() if ppid == pid]
    found.discard(os.getpid())
    return sorted(found)


def kill_box_processes(ids: list[str]) -> None:
    """End the box-side processes of these builds / volumes (SIGTERM, then SIGKILL)."""
    processes.terminate(lambda: _box_processes(ids), grace=10)


def clean_up_earlier(state_dir: Path) -> bool:
    """Stop a rehearsal still running from ``state_dir`` and remove what a killed one left behind.

    Returns whether there was anything to clean. The earlier harness gets SIGTERM first so it can
    stop its services in order; then every process left in the sessions it started, and every
    other marked process, gets SIGTERM, then SIGKILL.
    """
    did = False
    recorded = _read_state(state_dir)
    harness = recorded.get("harness_pid")
    if harness and _is_harness(harness):
        say(f"stopping the rehearsal still running (pid {harness}) ...")
        did = True
        os.kill(harness, signal.SIGTERM)
        _wait_gone([harness], 180)
    strays = _rehearsal_processes(state_dir)
    if strays:
        did = True
        say(f"stopping {len(strays)} processes left by an earlier rehearsal")
        processes.end(_our_sessions(state_dir))
        processes.terminate(lambda: _marked_processes(state_dir))  # marked, outside those sessions
    ebs_dir = state_dir / "ebs"
    stale_images = [p.stem for p in ebs_dir.glob("vol-*.img")] if ebs_dir.is_dir() else []
    # the boxes died with the local EC2 API (PR_SET_PDEATHSIG); this catches a build that did not
    kill_box_processes([*recorded.get("box_dirs", []), *stale_images])
    for work_dir in state_dir.glob(f"{WORK_DIR_PREFIX}*"):  # the killed run's box dirs
        did = True
        shutil.rmtree(work_dir, ignore_errors=True)
    if LoopEbs.cleanup_stale(ebs_dir) if ebs_dir.is_dir() else []:
        did = True
    snapshots_dir = state_dir / "snapshots"  # the killed run's snapshot copies (rehearsal.ebs.EbsSnapshots)
    if snapshots_dir.is_dir() and any(snapshots_dir.iterdir()):
        did = True
        shutil.rmtree(snapshots_dir)
    for key_dir in map(Path, recorded.get("key_dirs", [])):  # the killed run's repository signing key
        if key_dir.name.startswith(GNUPGHOME_PREFIX) and key_dir.is_dir():
            did = True
            shutil.rmtree(key_dir)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return did


# -- services ------------------------------------------------------------------------------------------
@dataclass
class Ec2Service:
    """Where the local EC2 API listens: the recording proxy (what Airflow uses) and moto itself."""

    endpoint_url: str
    moto_url: str
    region: str

    @property
    def control(self) -> Ec2Control:
        """Client of the proxy's control API (recorded calls, faults, latency, base images)."""
        return Ec2Control(self.endpoint_url)

    def moto_client(self) -> Any:
        """boto3 EC2 client straight to moto, so the harness's own checks are not recorded as ours."""
        import boto3

        return boto3.client(
            "ec2",
            endpoint_url=self.moto_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def default_subnet(ec2: Ec2Service) -> str:
    """A default subnet of moto's default VPC whose zone offers the box's default instance type (on
    AWS this is ``[amibake] subnet_id``; preflight refuses a zone that does not offer the type)."""
    client = ec2.moto_client()
    offered = {
        o["Location"]
        for o in client.describe_instance_type_offerings(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [defaults.DEFAULT_INSTANCE_TYPE]}],
        )["InstanceTypeOfferings"]
    }
    subnets = client.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    usable = sorted(
        (s["AvailabilityZone"], s["SubnetId"]) for s in subnets if s["AvailabilityZone"] in offered
    )
    if not usable:
        raise RehearsalError(
            f"the local EC2 API has no default subnet offering {defaults.DEFAULT_INSTANCE_TYPE}"
        )
    return usable[0][1]


@contextmanager
def local_ec2(
    log_path: Path,
    on_spawn: Callable[[int], object],
    *,
    boxes_dir: Path,
    snapshots_dir: Path,
    box_env: Mapping[str, str],
    timeout: float = 30.0,
) -> Iterator[Ec2Service]:
    """``python -m rehearsal.ec2_local`` in its own session until the block ends; ``on_spawn`` gets
    its pid at once. Every instance gets a box (its files in ``boxes_dir``, its build logs kept next
    to ``log_path``), or, launched from an AMI of a snapshot kept in ``snapshots_dir``, a qemu guest
    booting that AMI; both die with that process."""
    argv = [sys.executable, "-m", "rehearsal.ec2_local", "--port", "0", "--boxes", str(boxes_dir)]
    argv += ["--snapshots", str(snapshots_dir)]  # an AMI built here boots its own bytes (rehearsal.guests)
    argv += ["--iam-policy", str(POLICY_PATH)]  # amibake's IAM policy, enforced on every call
    argv += ["--box-logs", str(log_path.parent), *(f"--box-env={k}={v}" for k, v in box_env.items())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        on_spawn(proc.pid)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # its one line: {"endpoint_url", "moto_url", "region"}
        if not line:
            raise RehearsalError(
                f"local EC2 API did not start: {log_path.read_text(errors='replace')[-2000:]}"
            )
        info = json.loads(line)
        yield Ec2Service(info["endpoint_url"], info["moto_url"], info["region"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the DAG run -----------------------------------------------------------------------------------------
def wait_for_dag(airflow: LocalAirflow, dag_id: str, timeout: float = 180.0) -> None:
    """Wait until the dag-processor has parsed the DAG; raise with the import error if it failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        airflow.check_alive()
        errors = airflow.request("GET", "/api/v2/importErrors")["import_errors"]
        if errors:
            text = "\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in errors)
            raise RehearsalError(f"the DAG folder has import errors:\n{text}")
        try:
            airflow.request("GET", f"/api/v2/dags/{dag_id}")
            return
        except AirflowError as exc:
            if "HTTP 404" not in str(exc):
                raise
        time.sleep(1)
    raise RehearsalError(f"DAG {dag_id} was not parsed within {timeout:.0f} s (see the dag-processor log)")


def trigger(airflow: LocalAirflow, dag_id: str, conf: Mapping[str, Any]) -> str:
    """Unpause the DAG and trigger one run with ``conf``, as the UI does; returns the run id."""
    airflow.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    run = airflow.request(
        "POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": dict(conf)}
    )
    return run["dag_run_id"]


def task_instances(airflow: LocalAirflow, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of the run (REST API)."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances?limit=1000"
    return airflow.request("GET", path)["task_instances"]


def _q(value: str) -> str:
    """URL-quote a path segment (run ids contain ``:`` and ``+``)."""
    from urllib.parse import quote

    return quote(value, safe="")


def follow(airflow: LocalAirflow, dag_id: str, run_id: str, timeout: float, poll: float = 2.0) -> str:
    """Print each task's state changes until the run ends; returns the final run state."""
    started = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        airflow.check_alive()
        run = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}")
        for ti in task_instances(airflow, dag_id, run_id):
            state = ti["state"] or "none"
            # waiting states are not news; a deferred task passes through them when it resumes
            if state not in ("none", "scheduled", "queued") and seen.get(ti["task_id"]) != state:
                seen[ti["task_id"]] = state
                say(f"  {time.monotonic() - started:7.1f}s  {ti['task_id']:<28} {state}")
        if run["state"] in TERMINAL_STATES:
            return run["state"]
        if time.monotonic() - started > timeout:
            raise RehearsalError(f"run {run_id} did not finish within {timeout:.0f} s (state {run['state']})")
        time.sleep(poll)


def xcom_values(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict[str, Any]:
    """``task_id`` → its ``return_value`` XCom, for every task that returned something."""
    base = f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances"
    entries = airflow.request("GET", f"{base}/~/xcomEntries?limit=1000")["xcom_entries"]
    values = {}
    for entry in entries:
        if entry["key"] == "return_value":
            path = f"{base}/{entry['task_id']}/xcomEntries/return_value?deserialize=true"
            values[entry["task_id"]] = airflow.request("GET", path).get("value")
    return values


def log_tail(airflow: LocalAirflow, dag_id: str, run_id: str, ti: Mapping[str, Any], lines: int = 40) -> str:
    """The last lines of a task's log (REST API), one event per line."""
    path = (
        f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{ti['task_id']}"
        f"/logs/{max(1, ti['try_number'])}?full_content=true"
    )
    try:
        content = airflow.request("GET", path).get("content", [])
    except AirflowError as exc:
        return f"(log not available: {exc})"
    out = []
    for event in content:
        if not isinstance(event, dict):
            out.append(str(event))
            continue
        line = f"{event.get('level', ''):>7} {event.get('event', '')}".rstrip()
        for err in event.get("error_detail") or []:
            line += f"\n        {err.get('exc_type')}: {err.get('exc_value')}"
        out.append(line)
    return "\n".join(out[-lines:])


def run_dag(
    airflow: LocalAirflow,
    ec2: Ec2Service,
    dag_id: str,
    conf: Mapping[str, Any],
    timeout: float,
    on_trigger: Callable[[str], object],
) -> RunResult:
    """Trigger, follow and collect one run of the DAG (``on_trigger`` gets its id at once)."""
    started = time.monotonic()
    run_id = trigger(airflow, dag_id, conf)
    on_trigger(run_id)
    say(f"triggered {dag_id} run {run_id} with conf {json.dumps(dict(conf))}")
    state = follow(airflow, dag_id, run_id, timeout)
    wall = time.monotonic() - started
    tis = sorted(task_instances(airflow, dag_id, run_id), key=lambda t: t.get("start_date") or "~")
    values = xcom_values(airflow, dag_id, run_id)
    amis = AMI_RE.findall(json.dumps(values.get(AMI_TASK), default=str))
    snaps = SNAPSHOT_RE.findall(json.dumps(values.get(SNAPSHOT_TASK), default=str))
    result = RunResult(
        run_id=run_id,
        state=state,
        wall_seconds=wall,
        tasks=tis,
        ami_id=amis[0] if amis else None,
        snapshot_id=snaps[0] if snaps else None,
        ec2_calls=ec2.control.requests,
        dag_id=dag_id,
    )
    for ti in tis:
        if ti["state"] == "failed":
            result.failed.append(ti["task_id"])
            result.log_tails[ti["task_id"]] = log_tail(airflow, dag_id, run_id, ti)
    return result


# -- the whole rehearsal -----------------------------------------------------------------------------------
@dataclass
class Options:
    """What one rehearsal does (from the command line, or from the benchmarks)."""

    #: the image definition to build (a product definition in images/, or rehearsal-debian12)
    image: str = DEFAULT_IMAGE
    boot_check: bool = True
    keep_running: bool = False
    api_port: int = 0
    timeout: float = 3600.0
    state_dir: Path = REHEARSAL_DIR
    #: extra run conf (DAG Params) on top of boot_check / the base AMI
    conf: dict[str, Any] = field(default_factory=dict)
    #: extra ``[amibake]`` settings of its Airflow, on top of the rehearsal's own
    settings: dict[str, str] = field(default_factory=dict)
    #: run the local EC2 API in this process (so a benchmark can shape moto's state) instead of its own
    ec2_in_process: bool = False
    #: where the "box" keeps downloaded packages between rehearsals (None: download everything)
    package_cache: Path | None = field(default_factory=package_cache)

    @property
    def dag_id(self) -> str:
        """The DAG that builds ``image``."""
        return definition.dag_id(self.image)


def images_folder(state_dir: Path, repo: AptRepo, mirror: str = "") -> Path:
    """The rehearsal's ``[amibake] images_dir``: the product's definitions plus rehearsal-debian12,
    written afresh for this run's repository (its URL and key change every run) and Debian mirror."""
    folder = state_dir / "images"
    shutil.rmtree(folder, ignore_errors=True)
    return images.images_folder(folder, defaults.PACKAGE_IMAGES_DIR, repo, mirror)


def available_images() -> list[str]:
    """The names ``--image`` accepts: the product's definitions and the rehearsal's own."""
    return sorted({p.stem for p in definition.discover(defaults.PACKAGE_IMAGES_DIR)} | {DEFAULT_IMAGE})


@contextmanager
def rehearsal_services(
    opts: Options,
) -> Iterator[tuple[LocalAirflow, Ec2Service, LoopEbs, str, Callable[[str], object], ServedRepo]]:
    """Everything a rehearsal runs, started in order and stopped in reverse (also on error/Ctrl-C)."""
    state_dir = opts.state_dir
    if clean_up_earlier(state_dir):
        say("cleaned up what an earlier rehearsal left behind")
    shutil.rmtree(state_dir / "airflow", ignore_errors=True)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    os.environ[MARKER_ENV] = str(state_dir)  # inherited by every process started from here on
    run_ids: list[str] = []
    started: list[processes.Session] = []
    key_dirs: list[str] = []  # the repository's signing key (a temp GNUPGHOME), if this run is killed

    def save_state() -> None:
        """What a later run needs to clean up after this one if it is killed (removed once nothing
        is left)."""
        state = {
            "harness_pid": os.getpid(),
            "box_dirs": [build_id(opts.dag_id, r) for r in run_ids],
            "sessions": started,
            "key_dirs": key_dirs,
        }
        (state_dir / STATE_FILE).write_text(json.dumps(state))

    def spawned(pid: int) -> None:
        """Record a service's session the moment it exists."""
        started.append(processes.record(pid))
        save_state()

    save_state()
    with ExitStack() as stack:
        stack.enter_context(_shielded_cleanup())
        stack.callback(_forget_if_clean, state_dir)  # runs after every service below has stopped
        # the definitions' private repository, served until Airflow and the boxes are gone
        shutil.rmtree(state_dir / "aptrepo", ignore_errors=True)
        password = secrets.token_urlsafe(18)
        repo = stack.enter_context(AptRepo.serve(state_dir / "aptrepo", user=REPO_USER, password=password))
        served = ServedRepo(repo, REPO_USER, password)
        key_dirs.append(str(repo.gnupghome))
        save_state()
        # Debian's archive, its indexes frozen for this rehearsal: a push mid-run changes nothing
        shutil.rmtree(state_dir / "mirror", ignore_errors=True)
        mirror = stack.enter_context(FrozenMirror.serve(debian_upstreams(), state_dir / "mirror"))
        images_dir = images_folder(state_dir, repo, mirror.base("debian"))
        say(f"signed apt repository {repo.url} (basic auth, key {repo.fingerprint})")
        say(f"Debian mirror {mirror.base('debian')} (indexes frozen, from {mirror.upstreams['debian']})")
        say(f"image definitions in {images_dir}")
        box_env = package_cache_env(opts.package_cache)
        snapshots_dir = state_dir / "snapshots"
        if opts.ec2_in_process:
            snapshots = EbsSnapshots(snapshots_dir)
            boxes = Boxes(
                parent_dir=state_dir,
                session_env=box_env,
                keep_logs=state_dir / "logs",
                guests=Guests(snapshots, parent_dir=state_dir),
            )
            extensions = standard_extensions(policy=load_policy(), snapshots=snapshots, boxes=boxes)
            local = stack.enter_context(LocalEc2(extensions=extensions))
            ec2 = Ec2Service(local.endpoint_url, local.moto_url, local.region)
        else:
            log = state_dir / "logs" / "ec2_local.log"
            ec2 = stack.enter_context(
                local_ec2(log, spawned, boxes_dir=state_dir, snapshots_dir=snapshots_dir, box_env=box_env)
            )
        say(f"local EC2 API at {ec2.endpoint_url} (moto at {ec2.moto_url}, region {ec2.region})")
        base_ami = ec2.control.register_base_image(BASE_IMAGE_NAME)
        login = Login.new(default_user(BASE_IMAGE_NAME))
        cache = f"packages cached in {opts.package_cache}" if opts.package_cache else "no package cache"
        say(
            f"build boxes: each instance gets its own sshd on an address in {BOX_NETWORK}, reached as "
            f"{login.user} (sudo) with a throwaway key and its per-build host key ({cache})"
        )
        # straight to moto: the proxy records only the DAG's own EC2 calls
        ebs = LoopEbs(ec2.moto_url, ec2.region, state_dir / "ebs", snapshots_dir=snapshots_dir)
        stack.enter_context(ebs)
        stack.callback(lambda: kill_box_processes(ebs.history + [build_id(opts.dag_id, r) for r in run_ids]))
        settings = {**rehearsal_settings(date.today()), "subnet_id": default_subnet(ec2), **opts.settings}
        env = amibake_env(
            aws_extra={"endpoint_url": ec2.endpoint_url, "region_name": ec2.region},
            ssh_connection=login.connection(),
            settings={**settings, "images_dir": str(images_dir)},
        )
        env[conn_env_var(images.CONNECTION_ID)] = images.connection(REPO_USER, password)
        airflow = LocalAirflow(state_dir / "airflow", env, api_port=opts.api_port, on_spawn=spawned)
        stack.callback(airflow.stop)
        say(f"starting Airflow at {airflow.url} (logs in {airflow.log_dir}) ...")
        airflow.start()
        ec2.control.clear_requests()  # count only the DAG's own calls
        stack.callback(_ignore_interrupts)  # runs first when unwinding: a 2nd Ctrl-C must not cut it short
        yield airflow, ec2, ebs, base_ami, lambda run_id: (run_ids.append(run_id), save_state()), served
        say("stopping Airflow, the EBS emulator and the local EC2 API with its boxes ...")


def _forget_if_clean(state_dir: Path) -> None:
    """Remove the state file once nothing of the run is left; otherwise the next run needs it."""
    if not leftovers(state_dir):
        (state_dir / STATE_FILE).unlink(missing_ok=True)


def _ignore_interrupts() -> None:
    """From here on SIGINT / SIGTERM are ignored, so the clean-up runs to its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def _shielded_cleanup() -> Iterator[None]:
    """Restore the SIGINT / SIGTERM handlers after a clean-up that ignored them."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def leftovers(state_dir: Path) -> list[str]:
    """What of this rehearsal is still on the machine after it stopped (should be nothing)."""
    ebs_dir = state_dir / "ebs"
    found = [f"process {pid}" for pid in _rehearsal_processes(state_dir)]
    found += [f"box dir {d}" for d in state_dir.glob(f"{WORK_DIR_PREFIX}*")]
    found += [f"image {p}" for p in ebs_dir.glob("vol-*.img")] if ebs_dir.is_dir() else []
    loops = subprocess.run(["losetup", "-nO", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    found += [f"loop device {line}" for line in loops.splitlines() if str(ebs_dir) in line]
    return found


def mutating_calls(result: RunResult) -> list[str]:
    """The EC2 requests of a run that change something (not Describe*/Get*, not a DryRun)."""
    return [
        c["action"]
        for c in result.ec2_calls
        if not c["action"].startswith(("Describe", "Get")) and c["params"].get("DryRun") != "true"
    ]


def unchanged_problem(result: RunResult) -> str:
    """Why the unchanged night did not do what it must (green, nothing built), or ''."""
    night = result.unchanged
    if night is None:
        return ""
    if night.state != "success":
        return f"the unchanged night ended {night.state}"
    built = [t["task_id"] for t in night.tasks if t["task_id"] == AMI_TASK and t["state"] != "skipped"]
    if built or mutating_calls(night):
        return f"the unchanged night built anyway ({', '.join(mutating_calls(night)) or 'register ran'})"
    return ""


def retried_tasks(result: RunResult) -> list[str]:
    """Tasks that needed a retry (``try_number`` > 1): a clean run has none (issue 11, section 5)."""
    return [f"{ti['task_id']} (try {ti['try_number']})" for ti in result.tasks if ti.get("try_number", 1) > 1]


def summary(result: RunResult, airflow: LocalAirflow) -> str:
    """The end-of-run report: state, AMI, snapshot, time per task, the UI address."""
    lines = [
        "",
        f"run {result.run_id}: {result.state.upper()} in {result.wall_seconds:.0f} s",
        f"  AMI id:       {result.ami_id or '-'}",
        f"  snapshot id:  {result.snapshot_id or '-'}",
        f"  EC2 API calls: {len(result.ec2_calls)}",
        "  time per task:",
    ]
    for ti in result.tasks:
        secs = ti.get("duration")
        shown = f"{secs:8.1f} s" if secs is not None else "       - "
        tries = f"  (try {ti['try_number']})" if ti.get("try_number", 1) > 1 else ""
        lines.append(f"    {ti['task_id']:<30} {ti['state'] or 'none':<16} {shown}{tries}")
    retried = retried_tasks(result)
    lines.append(
        f"  RETRIES: {len(retried)} task(s) needed more than one try: {', '.join(retried)}"
        if retried
        else "  retries: none (every task succeeded or failed on its first try)"
    )
    for task_id, tail in result.log_tails.items():
        lines += ["", f"task {task_id} FAILED; end of its log:", tail]
    if result.leaks:
        lines.append("  REPOSITORY PASSWORD FOUND in: " + ", ".join(result.leaks))
    elif result.scanned:
        lines.append("  repository password: found nowhere (searched " + ", ".join(result.scanned) + ")")
    night = result.unchanged
    if night is not None:
        skipped = sum(1 for t in night.tasks if t["state"] == "skipped")
        lines += [
            "",
            f"next night, nothing changed: run {night.run_id}: {night.state.upper()} "
            f"in {night.wall_seconds:.0f} s",
            f"  {skipped} tasks skipped; EC2 API calls: {len(night.ec2_calls)}, of which changing something: "
            f"{len(mutating_calls(night))}",
        ]
        problem = unchanged_problem(result)
        if problem:
            lines.append(f"  UNCHANGED NIGHT FAILED: {problem}")
    login = f"user {ADMIN_USER}, password {airflow.password}"
    lines += ["", f"Airflow UI: {airflow.url}/dags/{result.dag_id}/runs/{_q(result.run_id)}  ({login})"]
    return "\n".join(lines)


def password_leaks(
    xcom: Mapping[str, Any], result: RunResult, served: ServedRepo, log_dirs: list[Path]
) -> tuple[list[str], list[str]]:
    """Where the repository password (or its Basic-auth token) is after the run: (hits, what was
    searched). Searched: the run's XCom values (``xcom``, from the REST API) and task instances (with
    their rendered fields), the recorded EC2 requests (UserData decoded), and every file under
    ``log_dirs``."""
    places = {
        "XCom": json.dumps(xcom, default=str),
        "task instances and rendered fields": json.dumps(result.tasks, default=str),
        "EC2 requests": leaks.ec2_request_text(result.ec2_calls),
    }
    files = sum(1 for d in log_dirs for p in d.rglob("*") if p.is_file())
    hits: list[str] = []
    for needle in served.needles():
        hits += [p for p in leaks.found_in(needle, places) if p not in hits]
        hits += [str(p) for p in leaks.files_holding(needle, log_dirs) if str(p) not in hits]
    scanned = [f"XCom of {len(xcom)} tasks", f"{len(result.tasks)} task instances"]
    scanned += [f"{len(result.ec2_calls)} EC2 requests", f"{files} files of the Airflow home and logs"]
    return hits, scanned


def rehearse(opts: Options) -> RunResult:
    """Run the whole rehearsal once; returns the result (raises ``RehearsalError`` on setup failure)."""
    with rehearsal_services(opts) as (airflow, ec2, ebs, base_ami, on_trigger, served):
        wait_for_dag(airflow, opts.dag_id)
        conf = {"boot_check": opts.boot_check, "base_ami": base_ami, **opts.conf}
        result = run_dag(airflow, ec2, opts.dag_id, conf, opts.timeout, on_trigger)
        log_dirs = [airflow.home, opts.state_dir / "logs"]
        xcom = xcom_values(airflow, result.dag_id, result.run_id)
        result.leaks, result.scanned = password_leaks(xcom, result, served, log_dirs)
        # only a verified AMI whose inputs could all be read lets the next night skip
        verified = (xcom.get(SMOKE_TASK) or {}).get("verified") is True
        if result.state == "success" and verified and (xcom.get(INPUTS_TASK) or {}).get("complete"):
            say("the next night, with nothing changed: triggering the DAG again ...")
            ec2.control.clear_requests()
            result.unchanged = run_dag(airflow, ec2, opts.dag_id, conf, opts.timeout, on_trigger)
        if served.repo.requests:
            asked, authorized = len(served.repo.requests), sum(ok for _, ok in served.repo.requests)
            say(f"  the apt repository got {asked} requests, {authorized} of them with the login")
        say(summary(result, airflow))
        say(f"  volumes backed by loop devices: {', '.join(ebs.history) or '-'}")
        if opts.keep_running:
            say(
                "\nAirflow keeps running for you to inspect the run. Stop it with Ctrl-C here, "
                "or `./rehearse stop` from another shell."
            )
            try:
                signal.pause()
            except KeyboardInterrupt:  # the way to stop it: the run's own result still counts
                pass
    if result.failed and any((opts.state_dir / "logs").glob("box-*")):
        say(f"the box's full phase logs were kept in {opts.state_dir / 'logs'}/box-*/")
    return result


def _parse_args(argv: list[str] | None) -> tuple[str, Options]:
    """Command line → (action, options), refusing bad values before anything starts."""
    parser = argparse.ArgumentParser(prog="./rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "stop"),
        default="run",
        help="run the rehearsal (default), or stop one left running and clean up",
    )
    parser.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        choices=available_images(),
        metavar="NAME",
        help=f"image definition to build, DAG amibake_NAME (default {DEFAULT_IMAGE}: Debian 12 with a "
        "package from a local password-protected repository, a file, a script, a service; the others "
        "are the product's images/*.yaml)",
    )
    parser.add_argument("--recipe", help=argparse.SUPPRESS)  # gone: only to say what replaced it
    parser.add_argument(
        "--no-boot-check",
        dest="boot_check",
        action="store_false",
        help="skip the qemu boot check of the built image",
    )
    parser.add_argument(
        "--no-package-cache",
        dest="package_cache",
        action="store_const",
        const=None,
        default=package_cache(),
        help="download every package again instead of reusing $AMIBAKE_PACKAGE_CACHE "
        "(default .cache/packages)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave Airflow and the local services running after the run",
    )
    parser.add_argument("--api-port", type=int, default=0, help="Airflow UI/API port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the DAG run may take")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REHEARSAL_DIR,
        help=f"where the rehearsal keeps Airflow, logs and disk images (default {REHEARSAL_DIR})",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra DAG Param for the run, e.g. --conf canvas_size_gib=4",
    )
    args = parser.parse_args(argv)
    if args.recipe is not None:
        parser.error(
            f"--recipe is gone: a definition names its recipe; use --image NAME (e.g. --image {args.recipe})"
        )
    if not 0 <= args.api_port <= 65535:
        parser.error(f"--api-port {args.api_port} must be between 0 and 65535")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        conf = parse_conf_items(args.conf)
    except ValueError as exc:
        parser.error(str(exc))
    return args.action, Options(
        image=args.image,
        boot_check=args.boot_check,
        keep_running=args.keep_running,
        api_port=args.api_port,
        timeout=args.timeout,
        state_dir=args.state_dir.resolve(),
        conf=conf,
        package_cache=args.package_cache,
    )


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C so every service is stopped in order."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``./rehearse``; exit 0 only when the DAG run succeeded and nothing was left."""
    action, opts = _parse_args(argv)
    if os.geteuid() != 0:
        say("./rehearse must run as root (loop devices, mounts, the build runs as root over SSH)")
        return 2
    if action == "stop":
        cleaned = clean_up_earlier(opts.state_dir)
        say("stopped and cleaned up" if cleaned else "nothing was running")
        return 0
    # SIGTERM (./rehearse stop, a CI timeout) unwinds like Ctrl-C, so every service is stopped
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = rehearse(opts)
        code = 0 if result.state == "success" and not result.leaks and not unchanged_problem(result) else 1
    except KeyboardInterrupt:
        say("interrupted: everything was stopped")
        code = 130
    except (RehearsalError, AirflowError) as exc:
        say(f"rehearsal failed: {exc}")
        code = 1
    left = leftovers(opts.state_dir)
    if left:  # the state file stays, so the next run (or ./rehearse stop) removes these
        say("left behind (`./rehearse stop` removes it): " + ", ".join(left))
        return code or 1
    say("all processes, loop devices, mounts and links were removed")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
