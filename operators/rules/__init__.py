"""Pure rules of amibake: names and tags, validation, box command lines, sweep and rotation plans.

No Airflow, boto or paramiko import anywhere in this package, so every rule is testable on its own
and usable from tools; the operators, hooks and triggers call these.
"""
