"""The result of :func:`keras_ce_plugin.testing.check_loss`: one line per check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASSED, FAILED, SKIPPED, WARNING = "passed", "failed", "skipped", "warning"
# An expected failure (``expected_failed_checks``) that failed, and one that passed:
# like a strict xfail, a passing expected failure fails the report.
XFAILED, XPASSED = "xfailed", "xpassed"


def first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception's message."""
    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not text:
        return type(exc).__name__
    line = text[0]
    if line.startswith("in user code") and len(text) > 1:  # tf.function: the cause is last
        line = text[-1]
    if len(line) > 120 and ". " in line[40:]:
        line = line[: line.index(". ", 40) + 1]
    if line.split(":")[0].endswith(("Error", "Exception")):
        return line[:240]
    return f"{type(exc).__name__}: {line[:240]}"


class LossContractError(AssertionError):
    """A loss breaks one or more checks of the loss contract."""


@dataclass
class CheckResult:
    """One check's outcome: ``passed``, ``failed``, ``skipped``, ``warning``, ``xfailed``
    (an expected failure) or ``xpassed`` (an expected failure that passes: a failure)."""

    check: str
    result: str
    reason: str
    fix: str = ""


@dataclass
class LossCheckReport:
    """Every check's result for one loss, in the order of ``CHECKS``."""

    loss: str
    results: dict[str, CheckResult] = field(default_factory=dict)
    hint: str = ""  # where the failures may come from the labels: which ones to pass

    def add(self, check: str, result: str, reason: str, fix: str = "") -> None:
        self.results[check] = CheckResult(check, result, reason, fix)

    def _ids(self, result: str) -> list[str]:
        return [c for c, r in self.results.items() if r.result == result]

    @property
    def passed(self) -> list[str]:
        return self._ids(PASSED)

    @property
    def failed(self) -> list[str]:
        return self._ids(FAILED)

    @property
    def skipped(self) -> list[str]:
        return self._ids(SKIPPED)

    @property
    def warnings(self) -> list[str]:
        return self._ids(WARNING)

    @property
    def xfailed(self) -> list[str]:
        return self._ids(XFAILED)

    @property
    def xpassed(self) -> list[str]:
        return self._ids(XPASSED)

    @property
    def ok(self) -> bool:
        """True when no check failed and no expected failure passed (skipped checks,
        expected failures and warnings are allowed)."""
        return not self.failed and not self.xpassed

    @property
    def details(self) -> dict[str, str]:
        """Check id -> its one-line reason."""
        return {c: r.reason for c, r in self.results.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary (for the command line)."""
        return {
            "loss": self.loss,
            "ok": self.ok,
            "hint": self.hint,
            "checks": [
                {"check": r.check, "result": r.result, "reason": r.reason, "fix": r.fix}
                for r in self.results.values()
            ],
        }

    def __str__(self) -> str:
        width = max([len("check")] + [len(c) for c in self.results])
        lines = [f"check_loss({self.loss})", f"{'check':<{width}}  result   reason"]
        for r in self.results.values():
            lines.append(f"{r.check:<{width}}  {r.result:<7}  {r.reason}")
        counts = ", ".join(
            f"{len(ids)} {name}"
            for name, ids in (
                (PASSED, self.passed),
                (FAILED, self.failed),
                (SKIPPED, self.skipped),
                ("warnings", self.warnings),
                (XFAILED, self.xfailed),
                (XPASSED, self.xpassed),
            )
            if ids
        )
        lines.append(f"{'OK' if self.ok else 'FAILED'}: {counts}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def error(self) -> LossContractError:
        """The exception ``check_loss`` raises: each failed check, why, and how to fix it."""
        bad = self.failed + self.xpassed
        lines = [f"{self.loss} fails {len(bad)} loss check(s):"]
        for check in bad:
            r = self.results[check]
            fix = f" Fix: {r.fix}" if r.fix else ""
            lines.append(f"  - {check}: {r.reason}.{fix}")
        if self.hint:
            lines.append(f"Hint: {self.hint}.")
        return LossContractError("\n".join(lines))
