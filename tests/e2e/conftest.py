"""End-to-end fixtures on top of tests/conftest.py."""

from __future__ import annotations

import sys
from pathlib import Path

# What a whole-DAG test reads after the run (tests/dag/dag_runs.py), shared with tests/dag.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dag"))
