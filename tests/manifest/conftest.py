"""Manifest tests run on tests/conftest.py's fixtures (the local EC2 API, its S3, the Airflow DB)."""

from __future__ import annotations

import sys
from pathlib import Path

# The operator harness of tests/operators runs an operator as the task runner would; tests/dag reads
# what a whole run left (XCom).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operators"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dag"))
