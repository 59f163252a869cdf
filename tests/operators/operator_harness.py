"""Run one operator the way the task runner and the triggerer would, without a scheduler.

``run_operator`` calls ``execute``; when the operator defers, the trigger is serialized and rebuilt
from its class path (as the triggerer does), its first event is awaited for real (against the local
EC2 API or sshd), and the named method resumes the task. The Airflow task instance is replaced by
``RecordingTI`` (try number, max tries, and a record of XCom pushes such as console links) because
these tests exercise the operators' AWS and SSH behaviour; the real runtime is exercised by the
whole-DAG tests in tests/dag.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, BaseOperator
from airflow.sdk.exceptions import TaskDeferred
from airflow.sdk.execution_time.context import OutletEventAccessors


@dataclass
class RecordingTI:
    """The parts of a task instance the operators use."""

    try_number: int = 1
    max_tries: int = 0
    map_index: int = -1
    pushed: dict[str, Any] = field(default_factory=dict)
    #: (dag id, run id) of the DAG runs the Task SDK would call queued or running (the sweeper asks)
    active_runs: set[tuple[str, str]] = field(default_factory=set)

    def xcom_push(self, key: str, value: Any) -> None:
        """Record an XCom push (the operators push console-link data)."""
        self.pushed[key] = value

    def get_dr_count(self, *, dag_id: str, run_ids: list[str], states: list[str]) -> int:
        """How many of ``run_ids`` are in ``states``: the runs of ``active_runs`` are running."""
        assert set(states) == {"queued", "running"}, states
        return sum((dag_id, run_id) in self.active_runs for run_id in run_ids)


@dataclass
class RunRecord:
    """What a run of one operator produced."""

    result: Any = None
    deferrals: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def make_context(
    dag: DAG, run_id: str, *, try_number: int = 1, max_tries: int = 0, run_after: datetime | None = None
) -> dict[str, Any]:
    """A task context with the keys amibake's operators read."""
    when = run_after or datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
    return {
        "dag": dag,
        "run_id": run_id,
        "ti": RecordingTI(try_number=try_number, max_tries=max_tries),
        "dag_run": type("DagRunInfo", (), {"run_after": when, "run_id": run_id})(),
        "outlet_events": OutletEventAccessors(),
    }


async def _first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("trigger ended without an event")


def rebuild(trigger: Any) -> Any:
    """Serialize a trigger and build it again from its class path, as the triggerer does."""
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


#: Seconds between a rebuilt trigger's polls at most. The product's delays are AWS's (15 s and more);
#: the local EC2 API models AWS's eventual consistency in under a second, so a first poll that lands
#: in that window would otherwise cost a whole product delay per test. Attempts are not changed.
POLL_S = 1


def run_operator(op: BaseOperator, context: dict[str, Any]) -> RunRecord:
    """execute → (defer → trigger → resume)* → result. A waiter trigger polls at most every
    ``POLL_S`` seconds."""
    record = RunRecord()
    call = lambda: op.execute(context)  # noqa: E731 - replaced by each resume below
    while True:
        try:
            record.result = call()
            return record
        except TaskDeferred as deferred:
            trigger = rebuild(deferred.trigger)
            if getattr(trigger, "waiter_delay", 0) > POLL_S:
                trigger.waiter_delay = POLL_S
            record.deferrals.append(type(trigger).__name__)
            event = asyncio.run(_first_event(trigger))
            record.events.append(event)
            method = getattr(op, deferred.method_name)
            # like dag.test (which drops the defer kwargs; the triggerer would merge them), so an
            # operator that needed them would fail here too
            call = lambda m=method, e=event: m(context, event=e)  # noqa: E731


