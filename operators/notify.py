"""Failure and deadline notifications through whichever Airflow notifier the deployment configures.

amibake names no mail server or chat service itself: ``[amibake] notifier`` is the dotted path of
any Airflow notifier class (a ``BaseNotifier``: SMTP, Slack, SNS, ... from their providers) and
``[amibake] notifier_kwargs`` its keyword arguments as JSON. Without one, failures are only logged.
Light at import time: the DAG file imports this module when it is parsed.
"""

from __future__ import annotations

import importlib
import json
import logging
from typing import Any

from operators import defaults

log = logging.getLogger(__name__)


def configured_notifier() -> Any | None:
    """An instance of the configured notifier class, or None when none is configured."""
    path = defaults.setting("notifier")
    if not path:
        return None
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"[amibake] notifier must be a dotted class path, got {path!r}")
    notifier_class = getattr(importlib.import_module(module_name), class_name)
    kwargs = json.loads(defaults.setting("notifier_kwargs") or "{}")
    if not isinstance(kwargs, dict):
        raise ValueError("[amibake] notifier_kwargs must be a JSON object")
    return notifier_class(**kwargs)


def failure_summary(context: Any) -> str:
    """One line saying which run failed and why, for the log and the notification."""
    dag_run = context.get("dag_run")
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id", "?")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    reason = context.get("reason") or context.get("exception") or "a task failed"
    return f"amibake: run {run_id} of {dag_id} failed ({reason}); its teardowns removed the build box"


def on_failure(context: Any) -> None:
    """DAG ``on_failure_callback``: log the failure and hand the context to the configured notifier."""
    log.error("%s", failure_summary(context))
    notifier = configured_notifier()
    if notifier is not None:
        notifier(context)


async def deadline_missed(**kwargs: Any) -> None:
    """Deadline alert callback (runs in the triggerer): a build runs past one of its deadlines.

    Airflow passes ``context={"dag_run": {...}, "deadline": {"id", "deadline_time"}}`` (the run as a
    dict, no task). Awaiting the notifier itself renders its templates with that context first.
    """
    context = kwargs.get("context") or kwargs
    run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    log.warning(
        "amibake: run %s of %s is still going past its deadline %s",
        run.get("dag_run_id", "?"),
        run.get("dag_id", "?"),
        deadline.get("deadline_time", "?"),
    )
    notifier = configured_notifier()
    if notifier is not None:
        notifier.context = context
        await notifier
