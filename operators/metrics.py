"""amibake's metrics, sent through Airflow's own metrics channel: StatsD or OpenTelemetry, whichever
``[metrics]`` turns on (``statsd_on`` / ``otel_on``; nothing is sent when neither is). Names get
Airflow's prefix (``[metrics] statsd_prefix``, ``airflow`` by default); each also carries its parts
as tags for the backends that keep tags (DogStatsD, OpenTelemetry).

| name | kind | when |
|---|---|---|
| ``amibake.<image>.phase.<phase>`` | timer (ms) | each build phase on the box, the boot check included |
| ``amibake.<image>.smoke_check`` | timer (ms) | the smoke instance: launch to the last first-boot check |
| ``amibake.<image>.built`` | counter | a night that builds (its inputs changed, or forced) |
| ``amibake.<image>.unchanged_skip`` | counter | a night skipped: its inputs are the newest verified AMI's |
| ``amibake.<image>.ami.created`` | counter | an AMI registered |
| ``amibake.<image>.ami.deprecated`` / ``.ami.deregistered`` | counter | rotation's retirements |
| ``amibake.sweeper.swept.<kind>`` | counter | leftovers the sweeper removed (instance, volume, ...) |
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType


def _stats() -> ModuleType:
    """Airflow's metrics facade (imported when a metric is sent, not when a DAG file is parsed)."""
    from airflow.sdk.observability import stats

    return stats


def _name(*parts: str) -> str:
    return _stats().normalize_name_for_stats(".".join(("amibake", *parts)), log_warning=False)


def count(image: str, what: str, n: int = 1) -> None:
    """Add ``n`` to ``amibake.<image>.<what>``."""
    if n:
        _stats().incr(_name(image, what), n, tags={"image": image})


def phases(image: str, seconds: Mapping[str, float]) -> None:
    """One timer per build phase (``amibake.<image>.phase.<phase>``)."""
    for phase, value in seconds.items():
        _stats().timing(_name(image, "phase", phase), value * 1000.0, tags={"image": image, "phase": phase})


def duration(image: str, what: str, seconds: float) -> None:
    """A timer ``amibake.<image>.<what>`` in milliseconds."""
    _stats().timing(_name(image, what), seconds * 1000.0, tags={"image": image})


def swept(kinds: Mapping[str, int]) -> None:
    """``amibake.sweeper.swept.<kind>`` by the number of resources of that kind removed."""
    for kind, n in kinds.items():
        if n:
            _stats().incr(_name("sweeper", "swept", kind), n, tags={"kind": kind})
