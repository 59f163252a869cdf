"""The Airflow UI in a real browser (issue 6), on the distributed deployment of docker-compose.yaml.

Headless Chromium from the Debian packages, driven by Selenium through Debian's chromedriver, against
the CeleryExecutor topology (``rehearsal.distributed.CeleryAirflow``: PostgreSQL + Redis started by
the test, api-server, scheduler, dag-processor, triggerer and a Celery worker as separate processes)
with the rehearsal's real services around it (``./rehearse``'s: moto behind the recording proxy with a
real box per instance, loop devices as the canvas).

As a person would: log in, open the DAG, read its docs, trigger it through the form with
non-default Params, see the run start on its page, come back to that page once the run has ended
(the REST API says when), open the build task's log and find the phase lines, and follow each AWS
task's console links. Screenshots of the grid and the log go to ``artifacts/`` (gitignored; the
README's copies live in docs/screenshots/).

While the person's run builds, a second run is triggered through the REST API, as the schedule would.
The DAG has ``max_active_runs=1``, so it must wait queued (not fail) and then build on its own box,
canvas and tags; every task of both runs runs on the Celery worker and the snapshot waits in the
triggerer. (One module for both: each whole build and Airflow deployment is made once.) This is the
suite's proof that a run triggered while another runs, a manual one during the nightly or the
reverse, waits queued instead of failing: the scheduler applies the limit to every run alike.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

import rehearsal.__main__ as rh
from operators.rules import definition, naming
from rehearsal import images
from rehearsal.airflow_env import ADMIN_USER, MARKER_ENV
from rehearsal.browser import chromium
from rehearsal.distributed import CeleryAirflow
from rehearsal.ec2_local import tag_specs

#: one worker runs the module, so its deployment (a module fixture) is started once; two whole
#: builds one after the other, in the module's first test: xdist queues the worker's next work when two
#: of its tests remain, so that work waits behind the two short tests below, not behind the builds
pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.xdist_group("ui-rehearsal"),
    pytest.mark.timeout(3600),
]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
DAG_ID = rh.DAG_ID
BUILD_TASK = "remote_chroot_build"
PREFIX = "ui-rehearsal"
#: AMI name prefix of the run the API triggers while the person's run builds
SECOND_PREFIX = "ui-second"
RUN_TIMEOUT_S = 1500
#: Tasks that wait in the triggerer here. A task whose resource is ready at its first look does not
#: defer at all (the deferral race, apache/airflow#66374), and the local EC2 API's instances and AMIs
#: are; its snapshots stay pending for SNAPSHOT_PENDING_S (set below), so the snapshot wait defers.
DEFERRING_TASKS = ("frozen_snapshot",)
SNAPSHOT_PENDING_S = 15  # well past the first look (right after the thaw), short of a second poll
FINAL_TASK_STATES = {"success", "failed", "upstream_failed", "skipped", "removed"}
PHASE_START = re.compile(r"phase (\w+) started")
PHASE_END = re.compile(r"phase (\w+) finished in ([0-9.]+) s")
#: Each AWS task's page links to what it made in the AWS console (resource id prefixes).
CONSOLE_LINKS = {
    "launch_build_box": ("i-", "sg-"),
    "attach_canvas": ("vol-",),
    "frozen_snapshot": ("snap-",),
    "register_hvm_ami": ("ami-",),
}
#: The form's typed-in Param fields (not the switches, not the hidden values of the dropdowns).
TEXT_FIELDS = "input[name^=element_]:not([type=hidden]):not([type=checkbox])"
#: Phases build-image runs for every recipe (docs/architecture.md), in order.
#: The form's sections (Param ``section=``) and the Params in each, as the DAG declares them. The
#: sections are one accordion that shows one section at a time: opening one closes the others.
SECTIONS = {
    "Image": ["force", "ami_name_prefix", "canvas_size_gib", "mirror_url", "boot_check"],
    "Build box": ["base_ami", "base_ami_owner", "base_ami_name", "instance_type", "subnet_id"],
    "Smoke check": ["smoke_check", "smoke_instance_type"],
    "Retention": ["keep_amis", "deprecate_grace"],
}
SECTION_OF = {param: section for section, params in SECTIONS.items() for param in params}
#: The optional text Params: nullable, default None, so their fields start empty (mirror_url does not:
#: its default is rehearsal-debian12's mirror, the rehearsal's frozen Debian mirror).
OPTIONAL_TEXT_PARAMS = {"ami_name_prefix", "base_ami", "subnet_id"}
#: Every task of a run (the task list of the run page): the 15 of dags/amibake_images.py.
TASK_COUNT = 15
CORE_PHASES = ["tools", "resolve", "partition", "mkfs", "mount", "bootstrap", "configure", "packages",
               "files", "provision", "bootloader"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The rehearsal's services with its Airflow swapped for the Celery deployment, shared by this
    module, and the URL of its frozen Debian mirror (the one its definition names).

    ``rehearsal_services`` builds the connections and settings and starts moto with its boxes and
    LoopEbs exactly as ``./rehearse`` does; only the Airflow class differs. Everything is stopped on
    exit, and nothing is left for a next rehearsal to clean up.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rh, "LocalAirflow", CeleryAirflow)
        patch.setenv(MARKER_ENV, "")  # the harness sets it; restored afterwards
        # The run page re-fetches every 15 s instead of Airflow's 3 s (an [api] setting of any
        # deployment): a person sees the same states; the browser re-renders and the API server
        # answers 5 times less often.
        patch.setenv("AIRFLOW__API__AUTO_REFRESH_INTERVAL", "15")
        state_dir = tmp_path_factory.mktemp("ui") / "rehearsal"
        # Both boots are proven by the green night (tests/e2e) in the same DAG: here they would only add
        # two TCG boots to what the UI shows. They are off by the settings that set the form's defaults.
        options = rh.Options(state_dir=state_dir, settings={"boot_check": "false", "smoke_check": "false"})
        with rh.rehearsal_services(options) as services:
            airflow, ec2 = services[:2]
            assert isinstance(airflow, CeleryAirflow)
            ec2.control.configure_rule("SnapshotProgress", duration=SNAPSHOT_PENDING_S)
            rh.wait_for_dag(airflow, DAG_ID)
            airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
            yield (*services, definition.load_named(state_dir / "images", images.NAME).mirror)
    assert rh.leftovers(state_dir) == []
    assert not (state_dir / rh.STATE_FILE).exists()  # nothing left, so nothing for a next run to clean


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium; on a failing test the last page is kept as ``artifacts/ui-failure.png``."""
    with chromium(log_path=tmp_path / "chromedriver.log") as driver:
        yield driver


def _wait(driver: WebDriver, seconds: float = 60) -> WebDriverWait:
    """Wait up to ``seconds``; the React UI re-renders often, so a stale element just means retry."""
    return WebDriverWait(
        driver, seconds, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)
    )


def login(driver: WebDriver, url: str, password: str) -> None:
    """The Simple auth manager's sign-in form."""
    driver.get(url + "/")
    _wait(driver).until(ec.visibility_of_element_located((By.NAME, "username"))).send_keys(ADMIN_USER)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(driver).until(lambda d: "/auth/login" not in d.current_url)


def set_field(driver: WebDriver, param: str, value: str) -> None:
    """Replace the value of a Param's text field in the trigger form (opening its section first)."""
    open_section(driver, SECTION_OF[param])
    box = _wait(driver).until(ec.visibility_of_element_located((By.NAME, f"element_{param}")))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    _wait(driver, 5).until(
        lambda d: d.find_element(By.NAME, f"element_{param}").get_attribute("value") == value
    )


def open_trigger_form(driver: WebDriver, url: str) -> WebElement:
    """The DAG page's Trigger button → the form (its sections still closed); returns the form."""
    driver.get(f"{url}/dags/{DAG_ID}")
    _wait(driver).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"))
    ).click()
    form = _wait(driver).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=config-form]"))
    )
    _wait(driver).until(lambda d: form.find_elements(By.CSS_SELECTOR, "input[name^=element_]"))
    titles = [
        b.text.strip()
        for b in form.find_elements(By.CSS_SELECTOR, "button[id^='accordion:'][id*=':trigger:']")
        if not b.get_attribute("id").endswith(":advancedOptions")
    ]
    assert titles == list(SECTIONS), titles
    return form


def open_section(driver: WebDriver, title: str) -> None:
    """Open one section of the form's accordion and wait until it has settled open.

    The dialog and the accordion animate: a click while they move is intercepted (or lands on
    the neighbouring section), so the trigger is scrolled to the middle of the dialog, clicked
    only once it is clickable, clicked again if the click was intercepted, and the section counts
    as open once its content is shown and no animation in it is running. The accordion's trigger
    ignores a synthetic JavaScript click (it reacts to pointer events), so the click is a real one.
    """
    locator = (By.CSS_SELECTOR, f"button[id^='accordion:'][id$=':trigger:{title}']")

    def settled_open(d: WebDriver) -> bool:
        button = d.find_element(*locator)
        content = d.find_element(By.ID, button.get_attribute("aria-controls"))
        if button.get_attribute("aria-expanded") != "true":
            d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
            if ec.element_to_be_clickable(button)(d):
                try:
                    button.click()
                except ElementClickInterceptedException:
                    pass  # something still moves over it: try again on the next poll
            return False
        return d.execute_script(
            "return arguments[0].checkVisibility() &&"
            " arguments[0].getAnimations({subtree: true}).every(a => a.playState !== 'running')",
            content,
        )

    _wait(driver, 30).until(settled_open, f"section {title!r} of the trigger form did not open")


def empty_text_fields(form: WebElement) -> list[str]:
    """Params whose text field is empty (the form treats each as a missing required value)."""
    return [
        box.get_attribute("name").removeprefix("element_")
        for box in form.find_elements(By.CSS_SELECTOR, TEXT_FIELDS)
        if not box.get_attribute("value")
    ]


def submit_enabled(driver: WebDriver) -> bool:
    """Whether the form's Trigger button can be pressed."""
    return driver.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]").is_enabled()


def submit(driver: WebDriver) -> str:
    """Press Trigger; returns the id of the run the UI then shows."""
    driver.find_element(By.CSS_SELECTOR, "[data-testid=trigger-dag-submit]").click()
    pattern = re.compile(rf"/dags/{DAG_ID}/runs/([^/?#]+)")
    _wait(driver).until(lambda d: pattern.search(d.current_url))
    return urllib.parse.unquote(pattern.search(driver.current_url).group(1))


def run_state(driver: WebDriver) -> str:
    """The state badge of the run page's header ("" while it is rendering)."""
    try:
        header = driver.find_element(By.CSS_SELECTOR, "[data-testid=header-card]")
        return header.find_element(By.CSS_SELECTOR, "[data-testid=state-badge]").text.strip().lower()
    except (WebDriverException, StaleElementReferenceException):
        return ""


def read_log(driver: WebDriver) -> list[str]:
    """Every line of the (virtualised) log view, read by scrolling it from top to bottom."""
    scroller = _wait(driver).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=virtual-scroll-container]"))
    )
    lines: dict[str, str] = {}
    driver.execute_script("arguments[0].scrollTop = 0", scroller)
    while True:
        for item in driver.find_elements(By.CSS_SELECTOR, "[data-testid^=virtualized-item-]"):
            try:
                lines[item.get_attribute("data-testid")] = item.text
            except StaleElementReferenceException:
                continue
        before = driver.execute_script("return arguments[0].scrollTop", scroller)
        driver.execute_script("arguments[0].scrollTop += arguments[0].clientHeight / 2", scroller)
        if driver.execute_script("return arguments[0].scrollTop", scroller) == before:
            break
    return [lines[k] for k in sorted(lines, key=lambda k: int(k.rsplit("-", 1)[1]))]


def test_a_person_triggers_and_watches_the_build_in_the_ui_while_a_second_run_waits(
    rehearsal: tuple, browser: WebDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    airflow, ec2, ebs, base_ami, record_run, _repo, mirror = rehearsal
    runs: dict[str, str] = {}  # AMI name prefix -> run id

    def triggered(run_id: str) -> None:
        """The person's run exists: record it, and trigger the second run now, while it builds."""
        record_run(run_id)  # so the harness removes what the build left on the "box"
        runs[PREFIX] = run_id
        conf = {"base_ami": base_ami, "ami_name_prefix": SECOND_PREFIX, "boot_check": False,
                "smoke_check": False}
        runs[SECOND_PREFIX] = rh.trigger(airflow, DAG_ID, conf)
        record_run(runs[SECOND_PREFIX])

    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    try:
        _drive(browser, airflow, base_ami, mirror, triggered)
    except BaseException:
        browser.save_screenshot(str(ARTIFACTS / "ui-failure.png"))
        raise
    browser.get("about:blank")  # nothing left to watch: no more page refreshes
    with capsys.disabled():
        print(f"\nCelery deployment: the person's session, from the DAG page to the run's console links "
              f"(a build without boots), took {time.monotonic() - started:.0f} s wall time")
    _second_run_waited_then_built_apart(airflow, ec2, ebs, runs)


def _drive(
    driver: WebDriver, airflow: Any, base_ami: str, mirror: str, on_triggered: Callable[[str], object]
) -> None:
    login(driver, airflow.url, airflow.password)

    # The DAG's page explains itself: its tags, and its docs one click away.
    driver.get(f"{airflow.url}/dags/{DAG_ID}")
    _wait(driver).until(ec.visibility_of_element_located((By.XPATH, "//a[normalize-space()='amibake']")))
    _wait(driver).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=markdown-button]"))
    ).click()
    docs = _wait(driver).until(
        lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]") if e.is_displayed()), None
        )
    )
    _wait(driver).until(lambda d: len(docs.text) > 200)  # rendered doc_md, not an empty dialog
    _wait(driver).until(
        lambda d: d.execute_script("return getComputedStyle(arguments[0]).opacity", docs) == "1"
    )
    driver.save_screenshot(str(ARTIFACTS / "ui-dag-docs.png"))
    docs.find_element(By.CSS_SELECTOR, "button[aria-label=Close]").click()

    # Trigger through the form: a non-default AMI name prefix, the harness's base AMI (AWS would
    # find one by name) and a Debian mirror typed in (the rehearsal's own, whose indexes stand still:
    # the internet's archive would make the night depend on it); the subnet is left empty, so
    # [amibake] subnet_id is used.
    form = open_trigger_form(driver, airflow.url)
    set_field(driver, "ami_name_prefix", PREFIX)
    set_field(driver, "base_ami", base_ami)
    set_field(driver, "mirror_url", mirror)
    assert empty_text_fields(form) == ["subnet_id"]
    run_id = submit(driver)
    on_triggered(run_id)
    conf = _run(airflow, run_id)["conf"]
    assert (conf["ami_name_prefix"], conf["base_ami"], conf["mirror_url"]) == (PREFIX, base_ami, mirror)
    # the switches' defaults are the [amibake] boot_check / smoke_check settings (off here)
    assert (conf["boot_check"], conf["smoke_check"]) == (False, False), conf
    assert "recipe" not in conf, "the definition says which recipe: the form does not offer it"
    assert conf.get("subnet_id") is None, conf

    # The run page shows the run begun; the person leaves it and comes back once the run has ended.
    # (Headless Chromium re-rendering the page for the whole build cost about 170 of the whole
    # suite's 2600 CPU-s; the README's figures.)
    run_page = driver.current_url
    _wait(driver).until(lambda d: run_state(d) in ("queued", "running", "success", "failed"))
    driver.get("about:blank")
    rh.follow(airflow, DAG_ID, run_id, RUN_TIMEOUT_S, poll=10)
    driver.get(run_page)
    state = _wait(driver).until(lambda d: run_state(d) in ("success", "failed") and run_state(d))
    # The run's state is final before its last teardown is: wait until the task list shows every
    # task finished, as a person would before taking the picture.
    _wait(driver, 300).until(
        lambda d: (
            (cells := d.find_elements(By.CSS_SELECTOR, "[data-testid=table-cell-state]"))
            and all(cell.text.strip().lower().replace(" ", "_") in FINAL_TASK_STATES for cell in cells)
        )
    )
    assert state == "success", _explain(airflow, run_id)  # the log below would only lack the phases
    tis = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{rh._q(run_id)}/taskInstances")
    ti_states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    assert len(ti_states) == TASK_COUNT and "rotate_amis" in ti_states, ti_states
    build_cell = driver.find_element(By.CSS_SELECTOR, f"[id='grid-{run_id}-{BUILD_TASK}']")
    assert build_cell.is_displayed()
    driver.save_screenshot(str(ARTIFACTS / "ui-grid.png"))

    # The build task's log shows each phase starting and ending, with its duration.
    driver.get(f"{airflow.url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/{BUILD_TASK}")
    _wait(driver).until(lambda d: any(PHASE_START.search(line) for line in read_log(d)))
    lines = read_log(driver)
    # Put the first phase lines in view for the screenshot.
    scroller = driver.find_element(By.CSS_SELECTOR, "[data-testid=virtual-scroll-container]")
    driver.execute_script("arguments[0].scrollTop = 0", scroller)
    first = _wait(driver).until(
        ec.presence_of_element_located(
            (
                By.XPATH,
                "//*[starts-with(@data-testid, 'virtualized-item-')][contains(., 'phase resolve started')]",
            )
        )
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", first)
    driver.save_screenshot(str(ARTIFACTS / "ui-build-log.png"))

    started = [m.group(1) for line in lines if (m := PHASE_START.search(line))]
    ended = {m.group(1): float(m.group(2)) for line in lines if (m := PHASE_END.search(line))}
    assert started[: len(CORE_PHASES)] == CORE_PHASES, lines
    assert set(started) == set(ended), lines

    # Each AWS task links to its instance, security group, volume, snapshot and AMI in the console.
    run_path = f"{airflow.url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}"
    for task_id, prefixes in CONSOLE_LINKS.items():
        driver.get(f"{run_path}/tasks/{task_id}/details")
        _wait(driver).until(
            lambda d, want=prefixes: (
                {
                    m.group(1)
                    for a in d.find_elements(By.CSS_SELECTOR, "a[href^='https://console.aws.amazon.com/']")
                    if (m := re.search(r"=((?:i|sg|vol|snap|ami)-)[0-9a-f]+$", a.get_attribute("href") or ""))
                }
                == set(want)
            )
        )


def _explain(airflow: Any, run_id: str) -> str:
    """States and failed tasks' log tails, for an assertion message."""
    lines = []
    for ti in rh.task_instances(airflow, DAG_ID, run_id):
        lines.append(f"{ti['task_id']}: {ti['state']}")
        if ti["state"] == "failed":
            lines.append(rh.log_tail(airflow, DAG_ID, run_id, ti))
    return "\n".join(lines)


def _second_run_waited_then_built_apart(airflow: Any, ec2: Any, ebs: Any, runs: dict[str, str]) -> None:
    """The second run was queued while the first built and started only after it ended; both ran
    every task on the Celery worker, deferred the snapshot wait to the triggerer, and built on their
    own box, canvas and tags (judged from the requests the DAG sent)."""
    first, second = runs[PREFIX], runs[SECOND_PREFIX]
    rh.follow(airflow, DAG_ID, second, RUN_TIMEOUT_S)
    run = _run(airflow, second)
    assert run["state"] == "success", _explain(airflow, second)
    # max_active_runs=1: created while the first ran, started once it had ended
    done = _run(airflow, first)
    assert done["state"] == "success", _explain(airflow, first)
    queued, first_ended, started = (
        datetime.fromisoformat(t) for t in (run["queued_at"], done["end_date"], run["start_date"])
    )
    assert queued < first_ended <= started, (done, run)

    # Every task instance ran on the Celery worker.
    worker_log = (airflow.log_dir / "worker.log").read_text(errors="replace")
    executed = [line for line in worker_log.splitlines() if "Executing workload in Celery" in line]
    for run_id in (first, second):
        tis = rh.task_instances(airflow, DAG_ID, run_id)
        # smoke_check off: the smoke task skips itself (on the worker) and rotation never runs
        skipped = {"smoke_instance", "rotate_amis"}
        assert {ti["task_id"]: ti["state"] for ti in tis} == {
            ti["task_id"]: "skipped" if ti["task_id"] in skipped else "success" for ti in tis
        }
        for ti in (ti for ti in tis if ti["task_id"] != "rotate_amis"):
            assert any(
                f"task_id='{ti['task_id']}'" in line and f"run_id='{run_id}'" in line for line in executed
            ), f"{ti['task_id']} of {run_id} was not executed by the Celery worker"

    # The deferred waits were handled by the triggerer: it wrote each trigger's own log beside
    # the task's, and the task resumed on the worker (same try, second workload).
    for run_id in (first, second):
        for task_id in DEFERRING_TASKS:
            task_dir = airflow.log_dir / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
            assert list(task_dir.glob("attempt=*.log.trigger.*.log")), f"{task_id} of {run_id} never deferred"
            workloads = [ln for ln in executed if f"task_id='{task_id}'" in ln and f"run_id='{run_id}'" in ln]
            assert len(workloads) >= 2, f"{task_id} of {run_id} did not resume on the worker after deferring"

    # Separate boxes, canvases and tags: judged from the requests the DAG sent.
    builds = {prefix: naming.build_id(DAG_ID, run_id) for prefix, run_id in runs.items()}
    assert len(set(builds.values())) == 2
    launches = ec2.control.calls("RunInstances")
    volumes = ec2.control.calls("CreateVolume")
    snapshots = ec2.control.calls("CreateSnapshot")
    images = ec2.control.calls("RegisterImage")
    for calls, resource, role in (
        (launches, "instance", naming.Role.BUILD_BOX),
        (volumes, "volume", naming.Role.CANVAS),
        (snapshots, "snapshot", naming.Role.SNAPSHOT),
    ):
        tagged = sorted(
            (tag_specs(c)[resource][naming.TAG_BUILD_ID], tag_specs(c)[resource][naming.TAG_RUN_ID])
            for c in calls
        )
        assert tagged == sorted((builds[p], r) for p, r in runs.items()), resource
        assert {tag_specs(c)[resource][naming.TAG_ROLE] for c in calls} == {str(role)}
    for prefix, build in builds.items():
        named = [c["Name"] for c in images if c["Name"].startswith(f"{prefix}-")]
        assert len(named) == 1 and named[0].endswith(build), images

    # Each canvas was attached to its own build's box, and both were removed again.
    moto = ec2.moto_client()
    box_of: dict[str, str] = {}
    for build in builds.values():
        found = moto.describe_instances(Filters=naming.build_filters(build, naming.Role.BUILD_BOX))
        (instance,) = [i for r in found["Reservations"] for i in r["Instances"]]
        box_of[build] = instance["InstanceId"]
    canvas_of = {tag_specs(c)["snapshot"][naming.TAG_BUILD_ID]: c["VolumeId"] for c in snapshots}
    attached = {(c["VolumeId"], c["InstanceId"]) for c in ec2.control.calls("AttachVolume")}
    assert attached == {(canvas_of[b], box_of[b]) for b in builds.values()}
    assert len(set(box_of.values())) == len(set(canvas_of.values())) == 2
    assert {c["InstanceId.1"] for c in ec2.control.calls("TerminateInstances")} >= set(box_of.values())
    assert {c["VolumeId"] for c in ec2.control.calls("DeleteVolume")} >= set(canvas_of.values())
    assert ebs.devices == {}


def _run(airflow: Any, run_id: str) -> dict[str, Any]:
    return airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{rh._q(run_id)}")


def test_the_trigger_form_accepts_the_defaults(rehearsal: tuple, browser: WebDriver) -> None:
    airflow = rehearsal[0]
    login(browser, airflow.url, airflow.password)
    form = open_trigger_form(browser, airflow.url)
    # Each section, opened in turn, shows its own Params' fields and hides the other sections'.
    for title, params in SECTIONS.items():
        open_section(browser, title)
        shown = {
            box.get_attribute("name").removeprefix("element_")
            for box in form.find_elements(By.CSS_SELECTOR, "input[name^=element_]")
            if box.is_displayed() or box.find_element(By.XPATH, "..").is_displayed()
        }
        assert shown == set(params), (title, shown)
    # The optional text Params are left empty (nullable, default None): Trigger stays enabled.
    assert set(empty_text_fields(form)) == OPTIONAL_TEXT_PARAMS
    _wait(browser, 10).until(submit_enabled, f"Trigger disabled; empty fields: {empty_text_fields(form)}")


def test_the_dag_page_names_an_owner(rehearsal: tuple, browser: WebDriver) -> None:
    airflow = rehearsal[0]
    login(browser, airflow.url, airflow.password)
    browser.get(f"{airflow.url}/dags/{DAG_ID}")
    owner = _wait(browser).until(ec.visibility_of_element_located((By.CSS_SELECTOR, "a[href*='owners=']")))
    assert owner.text == "amibake"
