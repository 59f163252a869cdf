"""rehearsal.leaks: the search for a repository password after a run, on real files and requests."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest

from rehearsal import leaks
from rehearsal.__main__ import RunResult, ServedRepo, password_leaks
from rehearsal.aptrepo import AptRepo

SECRET = "Repo-Pass-7c2e91"


def test_a_secret_is_found_in_any_file_under_the_roots_even_across_chunks(tmp_path: Path) -> None:
    logs, home = tmp_path / "logs", tmp_path / "home"
    (logs / "box-1").mkdir(parents=True)
    home.mkdir()
    (logs / "box-1" / "packages.log").write_text("apt-get install amibake-hello\nok\n")
    across = logs / "big.log"  # the secret straddles the edge of the first 1 MiB chunk
    across.write_bytes(b"x" * (leaks.CHUNK - 5) + SECRET.encode() + b"\n")
    db = home / "airflow.db"  # a value Airflow keeps in its SQLite database, as raw bytes
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE xcom (value TEXT)")
        conn.execute("INSERT INTO xcom VALUES (?)", (f'{{"note": "{SECRET}"}}',))
    conn.close()
    assert leaks.files_holding(SECRET, [home, logs]) == [db, across]
    assert leaks.files_holding("not-there-9f1", [home, logs]) == []


def test_places_and_ec2_requests_with_user_data_decoded() -> None:
    user_data = base64.b64encode(f"#cloud-config\npassword: {SECRET}\n".encode()).decode()
    requests = [
        {"action": "DescribeImages", "params": {"Owner.1": "self"}},
        {"action": "RunInstances", "params": {"UserData": user_data, "ImageId": "ami-12345678"}},
    ]
    text = leaks.ec2_request_text(requests)
    assert SECRET not in text.split("\n", 1)[0]  # base64 in the raw JSON: a plain search misses it
    places = {"EC2 requests": text, "XCom": '{"ami_id": "ami-12345678"}', "task logs": "password: ***"}
    assert leaks.found_in(SECRET, places) == ["EC2 requests"]
    assert leaks.found_in(SECRET, {"EC2 requests": leaks.ec2_request_text(requests[:1])}) == []


def test_an_empty_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty secret"):
        leaks.found_in("", {"x": "y"})
    with pytest.raises(ValueError, match="empty secret"):
        leaks.files_holding("", [tmp_path])


def test_the_rehearsals_check_names_each_place_of_the_password_or_its_basic_auth_token(
    tmp_path: Path,
) -> None:
    """What ``./rehearse`` runs after the DAG: a clean run passes, and each kind of leak is named (the
    password in a rendered field, the Basic-auth header's token in a task log file)."""
    logs = tmp_path / "logs"
    (logs / "dag_id=x").mkdir(parents=True)
    (logs / "dag_id=x" / "attempt=1.log").write_text('{"event": "handing the credentials over: ***"}\n')
    task = {"task_id": "remote_chroot_build", "rendered_fields": {"image": "rehearsal-debian12"}}
    result = RunResult("run-1", "success", 1.0, [task], ec2_calls=[{"action": "RunInstances", "params": {}}])
    xcom = {"remote_chroot_build": {"build_id": "ffc10b9978ec"}}
    with AptRepo.serve(tmp_path / "repo", user="amibake", password=SECRET) as repo:
        served = ServedRepo(repo, "amibake", SECRET)
    hits, scanned = password_leaks(xcom, result, served, [logs])
    assert hits == [] and scanned == ["XCom of 1 tasks", "1 task instances", "1 EC2 requests",
                                      "1 files of the Airflow home and logs"]  # fmt: skip
    task["rendered_fields"]["note"] = SECRET
    token = base64.b64encode(f"amibake:{SECRET}".encode()).decode()
    (logs / "dag_id=x" / "attempt=1.log").write_text(f"Authorization: Basic {token}\n")
    hits, _ = password_leaks(xcom, result, served, [logs])
    assert hits == ["task instances and rendered fields", str(logs / "dag_id=x" / "attempt=1.log")]
