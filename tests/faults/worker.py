"""A worker in its own process: runs ONE amibake operator through the operator harness.

The fault tests start it with ``python tests/faults/worker.py SPEC.json`` and kill it with SIGKILL at
a point they observe from outside (a recorded EC2 request, a phase log on the box), the way a worker
process dies in production; the retry then runs in the test process. The spec names the operator
class, its keyword arguments, the DAG id, the run id and the try number. On success the operator's
return value is printed as the last stdout line (JSON).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS / "operators")]


def main(spec_path: str) -> int:
    """Build the operator from the spec and run it like the task runner would."""
    from airflow.sdk import DAG
    from operator_harness import make_context, run_operator

    spec = json.loads(Path(spec_path).read_text())
    module, _, name = spec["operator"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with DAG(spec["dag_id"], schedule=None) as dag:
        op = cls(task_id=spec["task_id"], **spec["kwargs"])
    context = make_context(dag, spec["run_id"], try_number=spec["try_number"], max_tries=spec["max_tries"])
    result = run_operator(op, context).result
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
