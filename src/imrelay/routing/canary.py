"""Canary rollout: part of a rule's traffic goes to a candidate model, rolled back if worse.

Theory of operation.

*Who gets the candidate.* A rule with a ``canary`` sends a conversation to the candidate when
the conversation is one of ``canary.groups``, or when its bucket is below ``canary.percent``.
The bucket is a number in [0, 100) from SHA-256 over the rule's name, the platform and the
conversation id (:func:`canary_bucket`): the same conversation always lands in the same arm
(sticky), and two canaries slice the conversations independently.

*Decisions.* A canary is ``active`` until it is ``rolled_back`` (all of the rule's traffic back
to its own model) or ``promoted`` (all of it to the candidate). Decisions are kept in a small
JSON file next to the SQLite database (:func:`canary_state_path`), so a restart does not
re-enable a canary that was rolled back. A decision names its candidate: after the rule's
candidate is changed in the configuration, the old decision no longer applies. ``imrelay
canary promote|rollback|reset`` edit the same file; a running gateway re-reads it when its
modification time changes (checked every ``poll_s``, 2 s by default), and audits and logs
decisions it did not make itself. Writers take an exclusive ``flock`` on ``<file>.lock``
around read-modify-write and replace the file atomically; readers never see half a file.
(With ``storage.url: memory://`` decisions live in memory only.)

*Evaluation.* :class:`CanaryController` reads imrelay's own metrics: for a model,
``imrelay_model_requests_total{model}`` (all outcomes) are its requests, the outcomes other
than ``ok`` plus ``imrelay_model_fallbacks_total{model}`` (failures a fallback chain hid
from the user) its errors, and ``imrelay_model_latency_seconds{model}`` (sum and count, over
successful calls) its mean latency. It keeps a sample of the candidate's and the baseline's
(the rule's own model) counters at the start of a window. Once ``window_s`` has passed it
compares the increases (:func:`judge`): with fewer than ``min_requests`` candidate requests
it waits, and the window keeps growing; otherwise the candidate is rolled back when its error
rate exceeds the baseline's by more than ``max_error_rate_delta`` (a baseline without requests
counts as 0 %), or its mean latency exceeds the baseline's times ``max_latency_ratio`` (only
when both had successful calls); else the canary is kept and a new window starts. The
counters are per model, not per rule: traffic that reaches the same models by other routes
counts too.

A rollback is persisted first, then audited (an ``admin`` record, action
``canary_rollback``, sender ``imrelay``) and logged at WARNING with ``event.action``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from imrelay.config import CanarySettings, RoutingSettings
from imrelay.errors import StoreError
from imrelay.observability.metrics import Metrics

__all__ = [
    "CanaryAudit",
    "CanaryBook",
    "CanaryController",
    "CanaryDecision",
    "CanaryStateFile",
    "CanaryStatus",
    "Evaluation",
    "ModelSample",
    "canary_bucket",
    "canary_state_path",
    "judge",
    "read_model_sample",
]

logger = logging.getLogger(__name__)

CanaryStatus = Literal["active", "promoted", "rolled_back"]
Verdict = Literal["wait", "keep", "rollback"]

_VERSION: Final = 1
_AUTO: Final = "imrelay"  # ``by`` of decisions the gateway made itself
_SCALE: Final = 2**64


def canary_bucket(rule: str, platform: str, conversation_id: str) -> float:
    """The conversation's sticky position in [0, 100) for the canary of ``rule``."""
    digest = hashlib.sha256(f"{rule}\0{platform}\0{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / _SCALE


def canary_state_path(storage_url: str) -> Path | None:
    """Where canary decisions are kept: ``<database>.canary.json``; None for ``memory://``.

    Raises:
        ValueError: the URL is neither ``sqlite:///<path>`` nor ``memory://``.
    """
    scheme, sep, rest = storage_url.partition("://")
    if sep and scheme.lower() == "memory":
        return None
    if not sep or scheme.lower() != "sqlite" or not rest.startswith("/") or not rest[1:]:
        raise ValueError("canary state needs storage.url sqlite:///<path> or memory://")
    return Path(rest[1:] + ".canary.json")


# -- decisions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CanaryDecision:
    """A canary's recorded state.

    Attributes:
        candidate: the candidate model the decision was about.
        status: ``promoted`` or ``rolled_back`` (``active`` when reset).
        at: epoch seconds of the decision.
        by: ``imrelay`` (automatic) or ``cli:<user>``.
        reason: why, for people.
    """

    candidate: str
    status: CanaryStatus
    at: float
    by: str
    reason: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CanaryDecision:
        """Rebuild a decision from its JSON form.

        Raises:
            ValueError: a field is missing or has the wrong type.
        """
        status = data.get("status")
        if status not in ("active", "promoted", "rolled_back"):
            raise ValueError("unknown canary status")
        candidate, by, reason = data.get("candidate"), data.get("by"), data.get("reason", "")
        at = data.get("at")
        if (
            not isinstance(candidate, str)
            or not isinstance(by, str)
            or not isinstance(reason, str)
        ):
            raise ValueError("canary decision fields must be strings")
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ValueError("canary decision time must be a number")
        return cls(candidate, status, float(at), by, reason)


@dataclass(slots=True)
class _State:
    decisions: dict[str, CanaryDecision] = field(default_factory=dict)
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "rules": {name: asdict(d) for name, d in sorted(self.decisions.items())},
                "evaluations": dict(sorted(self.evaluations.items())),
            },
            ensure_ascii=False,
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> _State:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError("not a canary state file of a known version")
        rules, evaluations = data.get("rules", {}), data.get("evaluations", {})
        if not isinstance(rules, dict) or not isinstance(evaluations, dict):
            raise ValueError("canary state file: rules and evaluations must be mappings")
        decisions = {}
        for name, entry in rules.items():
            if not isinstance(entry, dict):
                raise ValueError("canary state file: a decision must be a mapping")
            decisions[str(name)] = CanaryDecision.from_dict(entry)
        return cls(decisions, {str(k): v for k, v in evaluations.items() if isinstance(v, dict)})


class CanaryStateFile:
    """The decisions on disk (see the module docstring); ``path=None`` keeps them in memory.

    Args:
        path: the JSON file (created on the first write, with its directory).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory = _State()

    def read(self) -> _State:
        """The current state (empty when the file does not exist yet).

        Raises:
            StoreError: the file cannot be read or is not a canary state file.
        """
        if self.path is None:
            return _State(dict(self._memory.decisions), dict(self._memory.evaluations))
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _State()
        except OSError as exc:
            raise StoreError(f"cannot read the canary state file: {exc}") from exc
        try:
            return _State.from_json(text)
        except ValueError as exc:
            raise StoreError(f"invalid canary state file {self.path}: {exc}") from None

    def stamp(self) -> tuple[int, int, int] | None:
        """The file's (inode, mtime_ns, size), or None without a file: a change means re-read.

        Every write replaces the file, so the inode changes even within one mtime tick.
        """
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path is not None  # nosec B101  # only called for a file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)  # closing releases the lock

    def update(self, change: Callable[[_State], None]) -> _State:
        """Read, apply ``change``, write back atomically, under the file lock.

        Raises:
            StoreError: the file cannot be read, parsed or written.
        """
        if self.path is None:
            change(self._memory)
            return self.read()
        try:
            with self._locked():
                state = self.read()
                change(state)
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(state.to_json() + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError as exc:
            raise StoreError(f"cannot write the canary state file: {exc}") from exc
        return state

    def decide(self, rule: str, decision: CanaryDecision | None) -> _State:
        """Record ``decision`` for ``rule`` (None: forget it, the canary is active again)."""

        def change(state: _State) -> None:
            if decision is None:
                state.decisions.pop(rule, None)
            else:
                state.decisions[rule] = decision

        return self.update(change)

    def note_evaluation(self, rule: str, evaluation: Evaluation, at: float) -> _State:
        """Keep the latest evaluation of ``rule`` for ``imrelay canary status``."""

        def change(state: _State) -> None:
            state.evaluations[rule] = {"at": at, **evaluation.to_dict()}

        return self.update(change)


class CanaryBook:
    """The decisions as the router sees them: in memory, refreshed from the state file.

    Args:
        store: the state file.
    """

    def __init__(self, store: CanaryStateFile) -> None:
        self.store = store
        self.decisions: dict[str, CanaryDecision] = {}
        self.evaluations: dict[str, dict[str, Any]] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False

    def status(self, rule: str, candidate: str) -> CanaryStatus:
        """The status of the canary of ``rule`` with ``candidate`` (``active`` if undecided)."""
        decision = self.decisions.get(rule)
        if decision is None or decision.candidate != candidate:
            return "active"
        return decision.status

    def load(self) -> dict[str, tuple[CanaryDecision | None, CanaryDecision | None]]:
        """Re-read the file if it changed; return the decisions that changed (old, new).

        Raises:
            StoreError: see :meth:`CanaryStateFile.read`.
        """
        stamp = self.store.stamp()
        if self._loaded and stamp == self._stamp and self.store.path is not None:
            return {}
        state = self.store.read()
        self._stamp, self._loaded = stamp, True
        changed = {
            rule: (self.decisions.get(rule), state.decisions.get(rule))
            for rule in set(self.decisions) | set(state.decisions)
            if self.decisions.get(rule) != state.decisions.get(rule)
        }
        self.decisions = dict(state.decisions)
        self.evaluations = dict(state.evaluations)
        return changed


# -- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSample:
    """A model's counters at one moment, or their increase over a window."""

    requests: float = 0.0
    errors: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0

    def minus(self, earlier: ModelSample) -> ModelSample:
        """The increase since ``earlier``."""
        return ModelSample(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.latency_sum - earlier.latency_sum,
            self.latency_count - earlier.latency_count,
        )

    @property
    def error_rate(self) -> float:
        """Errors per request (0 without requests)."""
        return self.errors / self.requests if self.requests > 0 else 0.0

    @property
    def mean_latency(self) -> float | None:
        """Mean seconds of a successful call, or None without one."""
        return self.latency_sum / self.latency_count if self.latency_count > 0 else None

    def to_dict(self) -> dict[str, float | None]:
        """The numbers, for the state file and logs."""
        mean = self.mean_latency
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "mean_latency_s": None if mean is None else round(mean, 4),
        }


def _samples(metric: Any, suffix: str, model: str) -> Iterator[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and sample.labels.get("model") == model:
                yield sample.labels, float(sample.value)


def read_model_sample(metrics: Metrics, model: str) -> ModelSample:
    """``model``'s counters now (see the module docstring for what counts as an error)."""
    requests = errors = 0.0
    for labels, value in _samples(metrics.model_requests, "_total", model):
        requests += value
        if labels.get("outcome") != "ok":
            errors += value
    errors += sum(v for _, v in _samples(metrics.model_fallbacks, "_total", model))
    latency_sum = sum(v for _, v in _samples(metrics.model_latency, "_sum", model))
    latency_count = sum(v for _, v in _samples(metrics.model_latency, "_count", model))
    return ModelSample(requests, errors, latency_sum, latency_count)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome of comparing a candidate with its baseline over one window."""

    verdict: Verdict
    reason: str
    candidate: ModelSample
    baseline: ModelSample

    def to_dict(self) -> dict[str, Any]:
        """For the state file and logs."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "candidate": self.candidate.to_dict(),
            "baseline": self.baseline.to_dict(),
        }


def judge(canary: CanarySettings, candidate: ModelSample, baseline: ModelSample) -> Evaluation:
    """Compare a window's increases (see the module docstring)."""
    if candidate.requests < canary.min_requests:
        reason = f"{candidate.requests:.0f} of {canary.min_requests} candidate requests so far"
        return Evaluation("wait", reason, candidate, baseline)
    delta = candidate.error_rate - baseline.error_rate
    if delta > canary.max_error_rate_delta:
        reason = (
            f"error rate {candidate.error_rate:.1%} vs baseline {baseline.error_rate:.1%} "
            f"(allowed +{canary.max_error_rate_delta:.1%})"
        )
        return Evaluation("rollback", reason, candidate, baseline)
    mine, theirs = candidate.mean_latency, baseline.mean_latency
    if mine is not None and theirs is not None and theirs > 0:
        ratio = mine / theirs
        if ratio > canary.max_latency_ratio:
            reason = (
                f"mean latency {mine:.3f}s vs baseline {theirs:.3f}s "
                f"(x{ratio:.2f}, allowed x{canary.max_latency_ratio:.2f})"
            )
            return Evaluation("rollback", reason, candidate, baseline)
    reason = f"error rate {candidate.error_rate:.1%} vs {baseline.error_rate:.1%}; within limits"
    return Evaluation("keep", reason, candidate, baseline)


class CanaryAudit(Protocol):
    """Where canary decisions are audited: :meth:`imrelay.security.audit.AuditLog.record_admin`."""

    async def record_admin(
        self,
        *,
        platform: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        action: str,
        args: str,
        outcome: Literal["ok", "failed", "denied", "invalid"],
        detail: str = "",
    ) -> Any:
        """Record one admin action."""
        ...


@dataclass(slots=True)
class _Window:
    started: float
    candidate: ModelSample
    baseline: ModelSample
    noted: float  # when an evaluation of this window was last written to the state file


@dataclass(frozen=True, slots=True)
class _Canary:
    rule: str
    baseline: str
    settings: CanarySettings


class CanaryController:
    """Evaluates active canaries and keeps the router's :class:`CanaryBook` fresh.

    Args:
        routing: the routing settings (rules with a ``canary``).
        book: the decisions the router reads.
        metrics: imrelay's metrics, read for error rates and latencies.
        audit: where decisions are audited; None: logged only.
        clock: epoch seconds (windows and decision times).
        poll_s: how often :meth:`run` re-reads the state file and checks windows.
    """

    def __init__(
        self,
        routing: RoutingSettings,
        book: CanaryBook,
        metrics: Metrics,
        *,
        audit: CanaryAudit | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 2.0,
    ) -> None:
        self.canaries = [
            _Canary(rule.name, rule.model, rule.canary)
            for rule in routing.rules
            if rule.canary is not None and rule.name is not None
        ]
        self.book = book
        self.metrics = metrics
        self.audit = audit
        self.clock = clock
        shortest = min((c.settings.window_s for c in self.canaries), default=poll_s)
        self.poll_s = min(poll_s, shortest)
        self._windows: dict[str, _Window] = {}

    async def run(self) -> None:
        """Every ``poll_s``: :meth:`tick`. Runs until cancelled; errors are logged, not raised."""
        while True:
            try:
                await self.tick()
            except Exception:  # a task boundary: keep evaluating on the next tick
                logger.exception("canary evaluation failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> list[tuple[str, Evaluation]]:
        """Re-read decisions, then judge each active canary whose window is over.

        Returns:
            The evaluations made, by rule.
        """
        for rule, (_, new) in (await asyncio.to_thread(self.book.load)).items():
            if new is not None and new.by != _AUTO:
                await self._report(rule, new)
        done: list[tuple[str, Evaluation]] = []
        now = self.clock()
        for canary in self.canaries:
            if self.book.status(canary.rule, canary.settings.model) != "active":
                self._windows.pop(canary.rule, None)
                continue
            candidate = read_model_sample(self.metrics, canary.settings.model)
            baseline = read_model_sample(self.metrics, canary.baseline)
            window = self._windows.get(canary.rule)
            if window is None:
                self._windows[canary.rule] = _Window(now, candidate, baseline, now)
                continue
            if now - window.started < canary.settings.window_s:
                continue
            evaluation = judge(
                canary.settings,
                candidate.minus(window.candidate),
                baseline.minus(window.baseline),
            )
            done.append((canary.rule, evaluation))
            if evaluation.verdict == "rollback":
                await self._roll_back(canary, evaluation, now)
                continue
            if evaluation.verdict == "keep":
                self._windows[canary.rule] = _Window(now, candidate, baseline, now)
            elif now - window.noted < canary.settings.window_s:
                continue  # still waiting for requests: note it once per window
            window.noted = now
            await asyncio.to_thread(self.book.store.note_evaluation, canary.rule, evaluation, now)
        return done

    async def _roll_back(self, canary: _Canary, evaluation: Evaluation, now: float) -> None:
        decision = CanaryDecision(
            canary.settings.model, "rolled_back", now, _AUTO, evaluation.reason
        )

        def change(state: _State) -> None:
            state.decisions[canary.rule] = decision
            state.evaluations[canary.rule] = {"at": now, **evaluation.to_dict()}

        self.book.decisions[canary.rule] = decision  # at once, even if the write fails
        self._windows.pop(canary.rule, None)
        try:
            await asyncio.to_thread(self.book.store.update, change)
        finally:
            await self._report(canary.rule, decision, evaluation)

    async def _report(
        self,
        rule: str,
        decision: CanaryDecision,
        evaluation: Evaluation | None = None,
    ) -> None:
        action = {
            "rolled_back": "canary_rollback",
            "promoted": "canary_promote",
            "active": "canary_reset",
        }[decision.status]
        extra: dict[str, Any] = {
            "event.action": action,
            "event.reason": decision.reason,
            "imrelay.canary.rule": rule,
            "imrelay.canary.candidate": decision.candidate,
            "imrelay.canary.by": decision.by,
        }
        if evaluation is not None:
            extra["imrelay.canary.evaluation"] = evaluation.to_dict()
        logger.warning(
            "canary %s: %s of %s by %s: %s",
            rule,
            decision.status.replace("_", " "),
            decision.candidate,
            decision.by,
            decision.reason,
            extra=extra,
        )
        if self.audit is None:
            return
        try:
            await self.audit.record_admin(
                platform="",
                message_id="",
                conversation_id="",
                sender_id=decision.by,
                action=action,
                args=rule,
                outcome="ok",
                detail=f"{decision.candidate}: {decision.reason}"[:500],
            )
        except StoreError as exc:
            logger.error("canary decision could not be audited: %s", exc)
