"""FingerprintInputs against the local EC2 API and a real HTTP mirror: the CentOS 7 recipe (the
product's default) fingerprinted from its mirror's repomd.xml files, then built, skipped, rebuilt.

The mirror is a CentOS-shaped tree served on 127.0.0.1 (CentOS 7 packages are not reachable from
here, but the fingerprint reads only the three repositories' metadata, which is what it reads on a
real night). The AMI of the "earlier night" is registered in moto with the tags RegisterHVMAmi and
SmokeInstance give a verified AMI.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import DownstreamTasksSkipped
from operator_harness import make_context

from operators import defaults
from operators.base import settings
from operators.fingerprint import FingerprintInputs
from operators.rules import definition, naming, validation
from operators.rules.naming import Role

RUN_ID = "scheduled__2026-11-30T02:00:00+00:00"
REPOS = ("os", "updates", "extras")


class _Mirror(http.server.SimpleHTTPRequestHandler):
    """Serves the tree; records each path; answers 503 for the paths in ``broken``."""

    seen: list[str]
    broken: set[str]

    def send_head(self) -> Any:
        self.seen.append(self.path)
        if self.path in self.broken:
            self.send_error(503)
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet."""


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path, type[_Mirror]]]:
    """A CentOS 7-shaped mirror (os, updates, extras repomd.xml) on 127.0.0.1."""
    for repo in REPOS:
        (tmp_path / "centos" / repo / "x86_64" / "repodata").mkdir(parents=True)
        (tmp_path / "centos" / repo / "x86_64" / "repodata" / "repomd.xml").write_text(
            f"<repomd>{repo} 1</repomd>"
        )
    handler = type("Handler", (_Mirror,), {"seen": [], "broken": set()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/centos", tmp_path / "centos", handler
    server.shutdown()
    server.server_close()
    thread.join()


def _build(mirror_url: str, **conf: Any) -> dict:
    image = definition.load(defaults.PACKAGE_IMAGES_DIR / "centos7.yaml")
    params = {"mirror_url": mirror_url, "base_ami": "ami-0123456789abcdef0", **conf}
    return validation.validate_image_build(image, params, settings()).as_dict()


def _run(build: dict) -> tuple[dict, list[str]]:
    """Run the task in a DAG with one step after it; (its XCom, the tasks it skipped)."""
    from airflow.providers.standard.operators.empty import EmptyOperator

    with DAG("amibake_t_fingerprint", schedule=None) as dag:
        task = FingerprintInputs(task_id="fingerprint_inputs", recipe="centos7", build=build)
        task >> EmptyOperator(task_id="launch_build_box")
    context = {**make_context(dag, RUN_ID), "task": task}
    try:
        return task.execute(context), []
    except DownstreamTasksSkipped as skipped:
        return context["ti"].pushed["return_value"], list(skipped.tasks)


def _verified_ami(ec2: Any, build: dict, result: dict) -> str:
    """An AMI of the line as an earlier green night leaves it: registered, tagged, verified."""
    client = ec2.boto3_client()
    snapshot = client.create_snapshot(
        VolumeId=client.create_volume(Size=8, AvailabilityZone=f"{ec2.region}a")["VolumeId"]
    )
    ami = client.register_image(
        Name=f"{build['ami_name_prefix']}-20261129-0200-x",
        Architecture="x86_64",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot["SnapshotId"]}}],
        VirtualizationType="hvm",
    )["ImageId"]
    tags = naming.resource_tags(
        build="f" * naming.BUILD_ID_LEN,
        dag_id="amibake_centos7",
        run_id="r1",
        recipe="centos7",
        role=Role.AMI,
    )
    tags += [
        {"Key": naming.TAG_IMAGE_LINE, "Value": build["ami_name_prefix"]},
        {"Key": naming.TAG_VERIFIED, "Value": naming.VERIFIED},
        {"Key": naming.TAG_FINGERPRINT, "Value": result["fingerprint"]},
        {"Key": naming.TAG_INPUTS, "Value": result["inputs"]},
    ]
    client.create_tags(Resources=[ami], Tags=tags)
    return ami


def test_a_night_builds_then_skips_then_rebuilds_when_a_repository_moves(
    ec2: Any, box_login: Any, subnet: dict, mirror: Any
) -> None:
    url, tree, handler = mirror
    build = _build(url)
    first, skipped = _run(build)
    assert first["build"] and skipped == []
    assert "no verified AMI of image line amibake-centos7 yet" in first["reason"]
    assert sorted(handler.seen) == sorted(f"/centos/{r}/x86_64/repodata/repomd.xml" for r in REPOS)
    assert {a["action"] for a in ec2.requests} == {"DescribeImages"}  # reads only, nothing created

    ami = _verified_ami(ec2, build, first)
    ec2.clear_requests()
    second, skipped = _run(build)
    assert (second["build"], second["newest_verified_ami"], skipped) == (False, ami, ["launch_build_box"])
    assert second["reason"].startswith(f"unchanged since {ami} built ")
    assert second["fingerprint"] == first["fingerprint"]
    assert {a["action"] for a in ec2.requests} == {"DescribeImages"}

    (tree / "updates" / "x86_64" / "repodata" / "repomd.xml").write_text("<repomd>updates 2</repomd>")
    third, skipped = _run(build)
    assert (third["build"], third["changed"], skipped) == (True, ["repo:updates"], [])
    assert third["reason"].startswith(f"changed since {ami} built ") and third["reason"].endswith(
        ": repo:updates"
    )


def test_force_an_unreadable_repository_and_another_definition_build(
    ec2: Any, box_login: Any, subnet: dict, mirror: Any
) -> None:
    url, _, handler = mirror
    build = _build(url)
    _verified_ami(ec2, build, _run(build)[0])
    forced, skipped = _run(_build(url, force=True))
    assert (forced["build"], skipped) == (True, [])
    assert forced["reason"].startswith("force is on")
    handler.broken.add("/centos/extras/x86_64/repodata/repomd.xml")
    blind, _ = _run(build)
    assert blind["build"] and "cannot tell whether anything changed (repo:extras: " in blind["reason"]
    assert "answered HTTP 503" in blind["reason"]
    handler.broken.clear()
    bigger, _ = _run(_build(url, canvas_size_gib=12))  # a form override is another definition
    assert (bigger["build"], bigger["changed"]) == (True, ["definition"])
