"""LocalAirflow's environment and its SQLite template; tests/dag/test_real_airflow.py runs it for real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from operators import defaults
from rehearsal import airflow_env
from rehearsal.airflow_env import (
    REHEARSAL_SETTINGS,
    amibake_env,
    conn_env_var,
    setting_env_var,
)


def test_amibake_env_names_the_dags_connections_and_settings():
    """The env defines exactly the connection ids and [amibake] keys the DAG reads."""
    env = amibake_env(
        aws_extra={"endpoint_url": "http://127.0.0.1:1", "region_name": "us-east-1"},
        ssh_connection={"conn_type": "ssh", "host": "127.0.0.1"},
        settings=REHEARSAL_SETTINGS,
    )
    assert json.loads(env["AIRFLOW_CONN_AMIBAKE_AWS"])["extra"]["endpoint_url"] == "http://127.0.0.1:1"
    assert conn_env_var(defaults.AWS_CONN_ID) in env and conn_env_var(defaults.SSH_CONN_ID) in env
    assert env["AIRFLOW__AMIBAKE__SSH_ADDRESS"] == "public_ip"  # as on AWS: each box on its own IP
    assert REHEARSAL_SETTINGS["ssh_address"] in defaults.SSH_ADDRESSES


def test_unknown_setting_is_refused():
    """A typo in a setting name fails loudly instead of being silently ignored by Airflow."""
    with pytest.raises(KeyError, match="ssh_adress"):
        setting_env_var("ssh_adress")


def test_dormant_schedule_never_fires_during_a_rehearsal():
    """Airflow's own timetable, unpaused today without catchup, schedules nothing for months."""
    from datetime import UTC, date, datetime, timedelta

    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable

    from rehearsal.airflow_env import rehearsal_settings

    schedule = rehearsal_settings(date.today())["schedule"]
    info = CronTriggerTimetable(schedule, timezone="UTC").next_dagrun_info(
        last_automated_data_interval=None, restriction=TimeRestriction(None, None, catchup=False)
    )
    assert info.run_after > datetime.now(UTC) + timedelta(days=150)


@pytest.mark.long
def test_a_new_sqlite_database_is_the_migrated_template_and_an_existing_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first new database is migrated for real and becomes the template; the next is its copy,
    at the head of Airflow's migrations; a database that exists is never replaced by the template."""
    import sqlite3
    from contextlib import closing

    from airflow.utils.db import _get_alembic_config
    from alembic.script import ScriptDirectory

    monkeypatch.setattr(airflow_env, "DB_TEMPLATES", tmp_path / "templates")

    def env(name: str) -> dict[str, str]:
        return {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / name}"}

    def revision(db: Path) -> str:
        with closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]

    airflow_env.migrate_db(env("first.db"))
    (template,) = (tmp_path / "templates").iterdir()
    head = ScriptDirectory.from_config(_get_alembic_config()).get_current_head()
    assert revision(tmp_path / "first.db") == revision(template) == head

    def mark(db: Path, key: str) -> None:
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("INSERT INTO variable (key, val, is_encrypted) VALUES (?, 'yes', 0)", (key,))

    def marks(db: Path) -> set[str]:
        with closing(sqlite3.connect(db)) as conn:
            return {row[0] for row in conn.execute("SELECT key FROM variable")}

    mark(template, "from-the-template")  # a migration would not make this row: a copy has it
    airflow_env.migrate_db(env("second.db"))
    assert marks(tmp_path / "second.db") == {"from-the-template"}
    assert revision(tmp_path / "second.db") == head

    mark(tmp_path / "first.db", "kept")  # a database in use keeps what it holds: migrated, not replaced
    airflow_env.migrate_db(env("first.db"))
    assert marks(tmp_path / "first.db") == {"kept"}
