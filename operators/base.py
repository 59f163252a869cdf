"""What every amibake operator shares: the provider's ``AwsBaseOperator`` with our EC2 hook, the
build id and its tags, the one defer-or-wait step and the one clean-up after a final failure.

``aws_conn_id`` defaults to ``[amibake] aws_conn_id`` (read from Airflow configuration, no I/O), and
region, retries and endpoint come from that connection, the same way for every operator.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.base_aws import AwsBaseOperator
from airflow.providers.amazon.aws.utils.mixins import aws_template_fields

from operators import defaults
from operators.hooks.ec2 import BuildEc2Hook
from operators.rules import errors, naming
from operators.rules.naming import Role

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.triggers.base import BaseTrigger


def settings() -> dict[str, str]:
    """Every ``[amibake]`` setting, read from Airflow configuration."""
    return {key: defaults.setting(key) for key in defaults.SETTINGS}


class AmibakeOperator(AwsBaseOperator[BuildEc2Hook]):
    """Base of amibake's operators: which connections, which build, how to wait.

    :param aws_conn_id: AWS connection (default: ``[amibake] aws_conn_id``, else ``amibake_aws``).
    :param ssh_conn_id: SSH connection of the box (default: ``[amibake] ssh_conn_id``).
    :param region_name: AWS region (default: the AWS connection's ``region_name``).
    :param recipe: the image recipe, written into every tag set.
    """

    aws_hook_class = BuildEc2Hook
    template_fields: Sequence[str] = aws_template_fields("recipe")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make ``execute`` and every ``execute_*`` resume method of a subclass fail at once on errors
        no retry can fix (:meth:`fail_fast`): one place for every operator, first try and resumes."""
        super().__init_subclass__(**kwargs)
        for name, method in list(vars(cls).items()):
            if callable(method) and (name == "execute" or name.startswith("execute_")):
                setattr(cls, name, _failing_fast(method))

    def user_given_ids(self) -> dict[str, str]:
        """``{value: field}`` of this task's user-given string fields (AMI, subnet, key, profile ...).

        XCom handed over between tasks arrives as dicts and is left out: a ``*.NotFound`` of a
        resource the run made is eventual consistency, not a wrong setting.
        """
        connection_fields = set(aws_template_fields()) | {"recipe"}
        return errors.user_ids_of(
            {f: getattr(self, f, None) for f in self.template_fields if f not in connection_fields}
        )

    def is_permanent(self, exc: BaseException) -> bool:
        """Whether no retry can fix ``exc`` (:func:`operators.rules.errors.classify`)."""
        return errors.classify(exc, self.user_given_ids()).permanent

    def __init__(
        self,
        *,
        recipe: str = defaults.DEFAULT_RECIPE,
        aws_conn_id: str | None = None,
        ssh_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(aws_conn_id=aws_conn_id or defaults.setting("aws_conn_id"), **kwargs)
        self.recipe = recipe
        self.ssh_conn_id = ssh_conn_id or defaults.setting("ssh_conn_id")

    def trigger_kwargs(self, region: str | None = None) -> dict[str, Any]:
        """Connection arguments every AWS trigger of this task needs (in ``region``, default its own),
        so the triggerer's client verifies TLS and retries as the task's does."""
        return {
            "aws_conn_id": self.aws_conn_id,
            "region_name": region or self.hook.conn_region_name,
            "verify": self.verify,
            "botocore_config": self.botocore_config,
        }

    def hook_in(self, region: str) -> BuildEc2Hook:
        """This task's EC2 hook in another ``region``: same connection, TLS and botocore settings
        (made once per region and task)."""
        hooks = self.__dict__.setdefault("_hooks_by_region", {})
        if region not in hooks:
            hooks[region] = BuildEc2Hook(
                aws_conn_id=self.aws_conn_id,
                region_name=region,
                verify=self.verify,
                config=self.botocore_config,
            )
        return hooks[region]

    def persist_link(self, link: Any, context: Context, **ids: str) -> None:
        """Store what the console link of ``link`` needs."""
        link.persist(
            context=context,
            operator=self,
            region_name=self.hook.conn_region_name,
            aws_partition=self.hook.conn_partition,
            **ids,
        )

    # -- the build -------------------------------------------------------------------------------
    @staticmethod
    def build_of(context: Context) -> str:
        """The build id of this run: the same for every try of every task."""
        return naming.build_id(context["dag"].dag_id, context["run_id"])

    def tags(self, context: Context, role: Role) -> list[dict[str, str]]:
        """The tag set of a resource of this build."""
        return naming.resource_tags(
            build=self.build_of(context),
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
            recipe=self.recipe,
            role=role,
        )

    @staticmethod
    def is_last_try(context: Context) -> bool:
        """Whether a failure now is final (no retry will reuse what this try created)."""
        ti = context["ti"]
        return ti.try_number > (ti.max_tries or 0)

    # -- waiting ---------------------------------------------------------------------------------
    def defer_or_wait(
        self,
        context: Context,
        *,
        done: Callable[[], bool],
        trigger: BaseTrigger,
        method_name: str,
        wait: Callable[[], None] | None = None,
        event: dict[str, Any],
    ) -> Any:
        """Resume with ``method_name(context, event)`` once the awaited state is reached.

        Asks first (``done``): a resource already in its state is not waited for at all, so a
        trigger that would fire within a second of ``defer()`` cannot race the scheduler
        (apache/airflow#66374). Otherwise the wait runs in the triggerer (``deferrable``) or here:
        ``wait``, or by default the trigger's own botocore waiter with its delay and attempts. A
        failed blocking wait resumes with an error event, as a failed trigger would.
        """
        if done():
            return getattr(self, method_name)(context, {**event, "status": "success"})
        if getattr(self, "deferrable", False):
            self.defer(trigger=trigger, method_name=method_name)
        try:
            if wait is not None:
                wait()
            else:  # an AwsBaseWaiterTrigger: the same waiter, blocking
                self.hook.wait(
                    trigger.waiter_name, (trigger.waiter_delay, trigger.attempts), **trigger.waiter_args
                )
        except Exception as exc:
            return getattr(self, method_name)(context, {**event, "status": "error", "message": str(exc)})
        return getattr(self, method_name)(context, {**event, "status": "success"})

    # -- failure ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cleanup_on_final_failure(
        self, context: Context, what: str, cleanup: Callable[[], object]
    ) -> Iterator[None]:
        """On a final failure, undo what this task made (a teardown does not run for a failed setup).

        ``TaskDeferred`` is a ``BaseException`` and passes through untouched. A failing clean-up is
        logged, never raised over the original error: the sweeper finds leftovers by their tags.
        """
        try:
            yield
        except Exception as exc:
            if self.is_last_try(context) or self.is_permanent(exc):
                build = self.build_of(context)
                self.log.error("build %s: %s failed for good; removing what it made", build, what)
                try:
                    cleanup()
                except Exception:
                    self.log.exception("clean-up of build %s failed; the sweeper will find it by tags", build)
            raise


def fail_fast(exc: Exception, verdict: errors.Verdict) -> Exception:
    """``exc`` re-typed as also an ``AirflowFailException`` (the task runner then skips every retry).

    The result is still an instance of the original type (``ParamError``, botocore's ``ClientError``
    ...), so callers and tests that catch that type see no difference; the fix is added as a note,
    which the task log prints under the traceback.
    """
    from airflow.sdk.exceptions import AirflowFailException

    if isinstance(exc, AirflowFailException):
        return exc
    failing = _fail_now_type(type(exc), AirflowFailException)
    new = failing.__new__(failing, *exc.args)
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    new.add_note(verdict.message())
    return new


@functools.cache
def _fail_now_type(base: type[Exception], fail: type[Exception]) -> type[Exception]:
    """A subclass of both ``base`` and ``AirflowFailException`` (one per type, cached)."""
    return type(base.__name__, (base, fail), {"__module__": base.__module__})


def _failing_fast(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one execute method: a permanent error is re-raised through :func:`fail_fast`."""

    @functools.wraps(method)
    def wrapper(self: AmibakeOperator, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # TaskDeferred is a BaseException and passes through
            verdict = errors.classify(exc, self.user_given_ids())
            if not verdict.permanent:
                raise
            self.log.error("%s", verdict.message())
            raise fail_fast(exc, verdict).with_traceback(exc.__traceback__) from exc.__cause__

    return wrapper
