"""docker-compose.yaml, Dockerfile and .env.example, checked without a Docker engine (none here).

The compose file is validated against the Compose Specification's JSON schema as shipped inside the
installed ``check-jsonschema`` package (nothing is downloaded), every host path it mounts must exist,
every ``AIRFLOW__SECTION__KEY`` must be an option Airflow (or our ``[amibake]`` section) knows, and
the connections and settings must be the ones the offline rehearsal gives its Airflow.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from airflow.configuration import conf

from operators import defaults
from rehearsal.airflow_env import REHEARSAL_SETTINGS, conn_env_var, setting_env_var

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
OFFICIAL_SERVICES = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
}
#: ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}`` interpolations of compose (``$$`` escapes).
INTERPOLATION_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as compose sees it after YAML anchors and merge keys."""
    return yaml.safe_load(COMPOSE.read_text())


def airflow_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image."""
    return {name: svc for name, svc in compose["services"].items() if name.startswith("airflow-")}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (compose allows a list of KEY=VALUE too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_file_is_valid_against_the_compose_specification(compose):
    """The schema is the one compose-spec publishes, vendored in check-jsonschema's wheel."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_broken_file(compose):
    """Guard against a vacuous check: an unknown service key must be reported."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restart_policy"] = "always"
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert any("restart_policy" in e.message for e in validator.iter_errors(broken))


def test_has_the_official_airflow_3_services(compose):
    """postgres, redis, api-server, scheduler, dag-processor, Celery worker, triggerer, init."""
    assert OFFICIAL_SERVICES <= set(compose["services"])
    commands = {n: s.get("command") for n, s in airflow_services(compose).items()}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-worker"] == "celery worker"
    assert commands["airflow-triggerer"] == "triggerer"
    assert commands["airflow-dag-processor"] == "dag-processor"
    for name, svc in airflow_services(compose).items():
        assert environment(svc)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert svc["build"]["target"] == "airflow", name


def test_every_mounted_host_path_and_build_context_exists(compose):
    """Relative bind mounts and build contexts resolve inside the repository."""
    checked = 0
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                checked += 1
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared named volume {source}"
        if "build" in svc:
            assert (REPO / svc["build"]["context"]).is_dir(), name
            target = svc["build"]["target"]
            assert re.search(rf"^FROM .+ AS {re.escape(target)}$", DOCKERFILE.read_text(), re.M), target
    assert checked, "no bind mount was checked"


def configured_options() -> dict[str, set[str]]:
    """Every option Airflow core and the installed providers describe, by section."""
    return {section: set(body.get("options", {})) for section, body in conf.configuration_description.items()}


def airflow_settings_named() -> set[str]:
    """Every ``AIRFLOW__SECTION__KEY`` named in the compose file and the Dockerfile."""
    text = COMPOSE.read_text() + DOCKERFILE.read_text()
    return set(re.findall(r"\bAIRFLOW__[A-Z0-9_]+__[A-Z0-9_]+\b", text))


def test_every_airflow_setting_named_is_a_real_option():
    """A misspelt AIRFLOW__SECTION__KEY is silently ignored by Airflow, so catch it here."""
    known = configured_options()
    names = airflow_settings_named()
    assert len(names) > 10
    for name in sorted(names):
        section, key = (part.lower() for part in name.removeprefix("AIRFLOW__").split("__", 1))
        if section == defaults.CONFIG_SECTION:
            assert key in defaults.SETTINGS, f"{name}: not an [amibake] setting"
        else:
            assert key in known.get(section, set()), f"{name}: [{section}] {key} is not an Airflow option"


def test_connections_and_settings_are_the_rehearsals(compose):
    """Same connection ids and [amibake] settings as the rehearsal; compose defaults = code defaults."""
    for name, svc in airflow_services(compose).items():
        env = environment(svc)
        conns = {k for k in env if k.startswith("AIRFLOW_CONN_")}
        assert conns == {conn_env_var(defaults.AWS_CONN_ID), conn_env_var(defaults.SSH_CONN_ID)}, name
        for key in {*REHEARSAL_SETTINGS, "schedule", "subnet_id"}:
            assert setting_env_var(key) in env, f"{name} does not set [amibake] {key}"
        for var, value in env.items():
            if not var.startswith(setting_env_var("ssh_address").rsplit("__", 1)[0] + "__"):
                continue
            key = var.rsplit("__", 1)[1].lower()
            match = INTERPOLATION_RE.fullmatch(value)
            assert match, f"{var} must come from the environment, not be fixed in the file"
            if match.group(2) == ":-":
                assert match.group(3) == defaults.SETTINGS[key], f"{var} default differs from the code's"


def test_every_amibake_setting_reaches_every_airflow_container(compose):
    """Each ``[amibake]`` setting is passed to every container running our image (compose environment or
    the Dockerfile's ENV), from an ``.env`` variable that ``.env.example`` lists with the code's default."""
    image_env = set(re.findall(r"^ENV (AIRFLOW__AMIBAKE__[A-Z0-9_]+)=", DOCKERFILE.read_text(), re.M))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name, svc in airflow_services(compose).items():
        env = environment(svc)
        for key, default in defaults.SETTINGS.items():
            var = setting_env_var(key)
            if var in image_env:
                continue
            assert var in env, f"{name} does not pass [amibake] {key}"
            match = INTERPOLATION_RE.fullmatch(env[var])
            assert match and match.group(1) in example, f"{var}: its .env variable is not in .env.example"
            if key != "schedule" and match.group(2) == ":-":  # the schedule's .env line shows the cron
                assert example[match.group(1)] in ("", default), (
                    f".env.example {match.group(1)} != code default"
                )


def test_secrets_come_from_the_environment_and_env_example_lists_them(compose):
    """No secret is written in the file; every variable it requires is in .env.example, left empty."""
    text = COMPOSE.read_text()
    required = {m.group(1) for m in INTERPOLATION_RE.finditer(text) if m.group(2) == ":?"}
    used = {m.group(1) for m in INTERPOLATION_RE.finditer(text)}
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET"} <= required
    assert used - {"AMIBAKE_IMAGE", "AMIBAKE_LOCAL_EC2_IMAGE", "AIRFLOW_API_PORT"} <= set(example)
    for var in required:
        assert example[var] == "", f".env.example must not carry a value for the secret {var}"
    for svc in compose["services"].values():
        for key, value in environment(svc).items():
            if re.search(r"PASSWORD|SECRET|FERNET|_CONN_", key):
                assert INTERPOLATION_RE.fullmatch(value), f"{key} is hard-coded"


def test_dockerfile_builds_from_the_airflow_we_test_with():
    """FROM apache/airflow at the installed version; dags, operators, include, images copied in; no .env."""
    from importlib.metadata import version

    text = DOCKERFILE.read_text()
    assert f"ARG AIRFLOW_VERSION={version('apache-airflow')}" in text
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}-python3\.11 AS airflow$", text, re.M)
    for path in ("dags", "operators", "include", "images"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path
        assert (REPO / path).is_dir()
    assert ".env" not in re.findall(r"^COPY (.*)$", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".rehearsal", ".git"} <= set(ignored)
