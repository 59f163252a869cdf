"""Lifecycle tests run on tests/conftest.py's fixtures (Airflow home, the local EC2 API, which answers
Enable/DisableImageDeprecation itself: rehearsal.aws_rules.ImageDeprecation)."""

from __future__ import annotations

import sys
from pathlib import Path

# The operator harness of tests/operators runs an operator as the task runner + triggerer would.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))
