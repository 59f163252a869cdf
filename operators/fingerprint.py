"""``FingerprintInputs``: build nothing on a night whose inputs are those of the newest verified AMI."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.skipmixin import SkipMixin
from airflow.sdk.bases.xcom import BaseXCom

from operators import defaults, metrics
from operators.base import AmibakeOperator, settings
from operators.rules import definition, records, validation
from operators.rules import fingerprint as rules
from operators.rules.preflight import default_mirror_of

if TYPE_CHECKING:
    from airflow.sdk import Context


def sources_of(image: definition.ImageDefinition, mirror: str) -> tuple[list[rules.Source], dict[str, str]]:
    """The repository metadata files of a night, and the repositories whose metadata cannot be named."""
    script = defaults.scripts_dir() / "recipes" / f"{image.recipe}.sh"
    base = mirror or default_mirror_of(script.read_text())
    unnamed = {}
    sources = []
    if base:
        sources += rules.recipe_metadata(image.recipe, base)
    else:
        unnamed[f"repo:{image.recipe}"] = (
            "the recipe's mirror is the box's own package sources, unknown here (set the definition's mirror)"
        )
    for repo in image.repositories:
        sources.append(rules.repository_metadata(repo.name, repo.base_url, repo.suite, repo.connection_id))
    return sources, unnamed


def read_inputs(image: definition.ImageDefinition, mirror: str, scripts: Path) -> rules.Fingerprint:
    """Fetch every repository's metadata and hash the definition and the tree shipped to the box."""
    from airflow.sdk import BaseHook

    from operators.hooks import repository

    sources, metadata = sources_of(image, mirror)
    for source in sources:
        login = password = ""
        if source.connection_id:
            conn = BaseHook.get_connection(source.connection_id)
            login, password = conn.login or "", conn.password or ""
        try:
            metadata[source.name] = repository.fetch(source.url, login=login, password=password)
        except repository.Unreadable as exc:
            metadata[source.name] = str(exc)
    with tempfile.TemporaryDirectory(prefix="amibake-fingerprint-") as staging:
        scripts_digest = definition.stage(Path(staging), scripts, image)
    return rules.parts_of(
        definition_hash=definition.canonical_hash(image),
        scripts_digest=scripts_digest,
        recipe_script=(scripts / "recipes" / f"{image.recipe}.sh").read_bytes(),
        metadata=metadata,
    )


class FingerprintInputs(AmibakeOperator, SkipMixin):
    """Fingerprint the night's inputs (:mod:`operators.rules.fingerprint`) from the worker, no box.

    When they are the newest verified AMI's of the image line (and ``force`` is off and the
    definition's ``rebuild_after`` has not passed), every downstream task except the teardowns and
    ``runs_anyway`` is skipped: no instance, volume or snapshot is created and the run is green; the log says
    "unchanged since ami-... built ...". Otherwise the build goes on and ``RegisterHVMAmi`` tags the
    new AMI with the fingerprint. XCom: ``records.Inputs``: ``{"build", "reason", "fingerprint",
    "complete", "inputs", "newest_verified_ami", "changed"}`` (pushed before the skip, too).

    :param build: ``validate_params``'s output (the validated Params, this run's overrides applied).
    :param runs_anyway: downstream tasks never skipped here: their trigger rules decide (the DAG's
        ``distribute_ami`` still distributes the newest verified AMI on a night that builds nothing).
    """

    template_fields: Sequence[str] = (*AmibakeOperator.template_fields, "build")
    ui_color = "#f3e5f5"

    def __init__(self, *, build: Any, runs_anyway: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build = build
        self.runs_anyway = tuple(runs_anyway)

    def execute(self, context: Context) -> records.Inputs:
        """Read the inputs, compare with the newest verified AMI, skip the night when nothing changed."""
        if not isinstance(self.build, dict):
            raise validation.ParamError(
                "build", f"must be validate_params' output (a dict), got {self.build!r}"
            )
        params = validation.validate_build(self.build, settings(), image=self.build.get("image", ""))
        image = validation.apply_form_values(
            definition.load_named(defaults.images_dir(), params.image), self.build
        )
        found = read_inputs(image, params.mirror_url or image.mirror, defaults.scripts_dir())
        decision = rules.decide(
            found,
            self.hook.account_images(),
            line=params.ami_name_prefix,
            now=datetime.now(UTC),
            rebuild_after_days=image.rebuild_after_days,
            force=params.force,
        )
        for name, value in sorted(found.parts.items()):
            self.log.info("input %s: %s", name, value)
        for name, why in sorted(found.unreadable.items()):
            self.log.warning("input %s unreadable: %s", name, why)
        self.log.info("fingerprint %s: %s", found.digest, decision.reason)
        result: records.Inputs = {
            "build": decision.build,
            "reason": decision.reason,
            "fingerprint": found.digest,
            "complete": found.complete,
            "inputs": found.inputs_tag(),
            "newest_verified_ami": decision.ami_id,
            "changed": list(decision.changed),
        }
        metrics.count(params.image, "built" if decision.build else "unchanged_skip")
        if not decision.build:
            to_skip = [
                t
                for t in context["task"].get_flat_relatives(upstream=False)
                if not t.is_teardown and t.task_id not in self.runs_anyway
            ]
            self.log.info("nothing to build: skipping %s", ", ".join(sorted(t.task_id for t in to_skip)))
            context["ti"].xcom_push(key=BaseXCom.XCOM_RETURN_KEY, value=result)  # skip() ends the task here
            self.skip(ti=context["ti"], tasks=to_skip)
        return result
