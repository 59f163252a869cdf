"""amibake operators: build a patched HVM AMI on a temporary EC2 build box.

Exports are resolved lazily (PEP 562) so that importing this package, as the DAG file does at
parse time, imports no provider, boto or paramiko code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LaunchBuildBox": "operators.build_box",
    "TerminateBuildBox": "operators.build_box",
    "AttachCanvas": "operators.canvas",
    "DeleteCanvas": "operators.canvas",
    "RemoteChrootBuild": "operators.remote_build",
    "FrozenSnapshot": "operators.snapshot",
    "RegisterHVMAmi": "operators.ami",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported operator class on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'operators' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
