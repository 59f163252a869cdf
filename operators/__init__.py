"""amibake operators: build a patched HVM AMI on a temporary EC2 build box.

Layout, the way the Amazon provider splits it: one module per operator at this level (``base`` is
their common base), ``hooks/`` (the one door to EC2, the one door to the box), ``triggers/``
(deferred waits), ``links/`` (console links), and ``rules/`` (pure rules, no Airflow import).
Exports are resolved lazily (PEP 562): importing this package imports no operator module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LaunchBuildBox": "operators.build_box",
    "TerminateBuildBox": "operators.build_box",
    "AttachCanvas": "operators.canvas",
    "DeleteCanvas": "operators.canvas",
    "FingerprintInputs": "operators.fingerprint",
    "RemoteChrootBuild": "operators.remote_build",
    "FrozenSnapshot": "operators.snapshot",
    "RegisterHVMAmi": "operators.ami",
    "SmokeInstance": "operators.smoke",
    "TerminateSmokeInstance": "operators.smoke",
    "RotateAmis": "operators.rotate",
    "PublishManifest": "operators.manifest",
    "DistributeAmi": "operators.distribute",
    "SweepOrphans": "operators.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported operator class on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'operators' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
