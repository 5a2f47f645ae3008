"""One place per check: its id, what it needs, when it passes and how to fix it.

Each check is defined once, by decorating its implementation (``Subject ->
(result, reason)``) with :func:`check`. The decorator records a :class:`Check` in
:data:`REGISTRY` (in definition order: the order of ``CHECKS`` and of every
report) and returns the public function ``check_<id>(loss, **kwargs)``, which runs
that check alone, like scikit-learn's ``check_*`` functions. The docstring table of
``keras_ce_plugin.testing`` is :func:`table` of the same records (a test compares).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from keras_ce_plugin.testing._inputs import Subject
from keras_ce_plugin.testing._report import CheckResult

Outcome = tuple[str, str]


@dataclass(frozen=True)
class Check:
    """A check of the loss contract."""

    id: str
    passes_when: str  # the docstring table's text
    fix: str  # what to change when it fails
    needs: str  # what it needs to run (else it reports `skipped` with why)
    impl: Callable[[Subject], Outcome]
    applies: Callable[[Subject], str | None]  # None, or why the check does not apply
    fresh: bool = False  # runs in a fresh process (run_many schedules it)


REGISTRY: dict[str, Check] = {}
# What runs the checks (``_run.run_many``): ``_run`` imports this module and sets it,
# so that this module does not import ``_run`` back.
_RUNNER: list[Callable[..., Any]] = []


def set_runner(run_many: Callable[..., Any]) -> None:
    """Sets what the public ``check_<id>`` functions run the checks with."""
    _RUNNER[:] = [run_many]


def _always(s: Subject) -> str | None:
    return None


def check(
    id: str,
    *,
    passes_when: str,
    fix: str,
    needs: str = "the loss",
    applies: Callable[[Subject], str | None] = _always,
    fresh: bool = False,
) -> Callable[[Callable[[Subject], Outcome]], Callable[..., CheckResult]]:
    """Registers ``impl`` as check ``id``; returns the public ``check_<id>`` function."""

    def decorate(impl: Callable[[Subject], Outcome]) -> Callable[..., CheckResult]:
        if id in REGISTRY:
            raise ValueError(f"check {id!r} is defined twice")
        spec = Check(id, " ".join(passes_when.split()), fix, needs, impl, applies, fresh)
        REGISTRY[id] = spec

        def public(loss: Any, **kwargs: Any) -> CheckResult:
            (run_many,) = _RUNNER
            raise_on_failure = kwargs.pop("raise_on_failure", True)
            timeout = kwargs.pop("timeout", 300.0)
            (report,) = run_many([(loss, {**kwargs, "checks": [id]})], timeout=timeout)
            if raise_on_failure and not report.ok:
                raise report.error()
            return report.results[id]

        public.__name__ = public.__qualname__ = f"check_{id}"
        public.__doc__ = (
            f"Check ``{id}``: passes when {spec.passes_when}.\n\n"
            f"Needs {needs}. Takes :func:`check_loss`'s keyword arguments; returns the\n"
            "``CheckResult``; raises ``LossContractError`` when it fails (unless\n"
            f"``raise_on_failure=False``). Fix: {fix}."
        )
        public.spec = spec  # type: ignore[attr-defined]
        return public

    return decorate


def applicable(s: Subject, ids: list[str] | None = None) -> Iterator[Check]:
    """The checks (of ``ids``, default all) that apply to the subject ``s``."""
    for name in ids if ids is not None else list(REGISTRY):
        spec = REGISTRY[name]
        if spec.applies(s) is None:
            yield spec


def table() -> str:
    """The reStructuredText table of the check ids and when each passes."""
    width = max(len(c) for c in REGISTRY) + 2
    text_width = 78 - width - 2
    rule = f"{'=' * width}  {'=' * text_width}"
    lines = [rule, f"{'id':<{width}}  passes when", rule]
    for spec in REGISTRY.values():
        wrapped = textwrap.wrap(spec.passes_when, text_width) or [""]
        lines.append(f"{spec.id:<{width}}  {wrapped[0]}".rstrip())
        lines += [f"{'':<{width}}  {line}" for line in wrapped[1:]]
    lines.append(rule)
    return "\n".join(lines)
