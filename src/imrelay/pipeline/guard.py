"""Guard stages: rate limits, access control and admin commands; and the audit settle hook.

Theory of operation: the stages run early, before anything costly, in this order::

    dedup → access (mention) → rate_limit → permission → kind → admin → command → …

- :class:`RateLimitStage` takes a token from the sender's and the conversation's bucket; when
  either is empty the message is dropped (``rate_limited``) before it reaches the store or the
  model, with one polite notice per key per ``notice_interval_s`` and one ``rate_limited`` audit
  record for that window.
- :class:`PermissionStage` applies the allow/deny rules; a denied message is dropped
  (``access_denied``) with the configured notice and an ``access_denied`` audit record naming
  the rule.
- :class:`AdminCommandStage` answers ``/status``, ``/reload`` and ``/model [name]`` for admins
  (``admin_command``); anyone else gets the admin-denied notice (``admin_denied``). Each attempt
  writes an ``admin`` audit record (outcome ``ok``, ``failed``, ``invalid`` or ``denied``).

Every message also gets one ``message`` audit record when the runner settles it: the runner
calls :func:`audit_settled` after recording the final state.

``/model NAME`` pins a conversation to a model through a :class:`ModelPins` store. Pins are
kept in memory (:class:`MemoryModelPins`) and are lost on restart; the route stage reads them
with :func:`pin_key_for`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import Final, Literal, Protocol

from imrelay.errors import IMRelayError, StoreError
from imrelay.message import InboundMessage
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.security.access import AccessPolicy
from imrelay.security.audit import AuditLog
from imrelay.security.ratelimit import KeyedLimiter, RateLimitRule, RateLimitSettings

__all__ = [
    "ADMIN_COMMAND",
    "ADMIN_DENIED",
    "CLEAR_WORDS",
    "DENIED",
    "RATE_LIMITED",
    "AdminCommandStage",
    "MemoryModelPins",
    "ModelPins",
    "PermissionStage",
    "RateLimitStage",
    "audit_settled",
    "pin_key_for",
]

RATE_LIMITED: Final = "rate_limited"
DENIED: Final = "access_denied"
ADMIN_DENIED: Final = "admin_denied"
ADMIN_COMMAND: Final = "admin_command"
CLEAR_WORDS: Final = frozenset({"clear", "reset", "auto"})
_MAX_REPLY: Final = 500

StatusProvider = Callable[[], Awaitable[str]]
ReloadHook = Callable[[], Awaitable[str]]
AdminOutcome = Literal["ok", "failed", "invalid", "denied"]
Scope = Literal["user", "conversation"]


# -- rate limits -----------------------------------------------------------------------------


class RateLimitStage:
    """Per-user and per-conversation token buckets (see :mod:`imrelay.security.ratelimit`).

    Args:
        settings: ``security.rate_limit``.
        clock: monotonic seconds (buckets and notice windows).
        audit: where ``rate_limited`` records go, if anywhere.
        exempt: messages for which limits do not apply (e.g. ``AccessPolicy.is_admin``).
    """

    name = "rate_limit"

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        audit: AuditLog | None = None,
        exempt: Callable[[InboundMessage], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.audit = audit
        self.exempt = exempt
        rules: list[tuple[Scope, RateLimitRule | None]] = [
            ("user", settings.per_user),
            ("conversation", settings.per_conversation),
        ]
        self.limiters: dict[Scope, KeyedLimiter] = {
            scope: KeyedLimiter.from_rule(rule, clock=clock, max_keys=settings.max_keys)
            for scope, rule in rules
            if rule is not None and settings.enabled
        }
        self._noticed: OrderedDict[str, float] = OrderedDict()

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        if not self.limiters or (self.exempt is not None and self.exempt(msg)):
            return ctx
        keys = {
            "user": f"user:{msg.platform}:{msg.sender.id}",
            "conversation": f"conversation:{msg.platform}:{msg.conversation.id}",
        }
        waits = {scope: lim.wait_time(keys[scope]) for scope, lim in self.limiters.items()}
        scope = max(waits, key=lambda s: waits[s])
        if waits[scope] == 0.0:
            for scope_, limiter in self.limiters.items():
                limiter.take(keys[scope_])
            return ctx
        ctx.log.debug("rate limited (%s) for %.1fs", scope, waits[scope])
        if not self._notice_due(keys[scope]):
            return Drop(RATE_LIMITED)
        if self.audit is not None:
            await self.audit.record_rate_limited(
                platform=msg.platform,
                message_id=msg.message_id,
                conversation_id=msg.conversation.id,
                sender_id=msg.sender.id,
                scope=scope,
                retry_after_s=waits[scope],
            )
        seconds = str(max(math.ceil(waits[scope]), 1))
        notice = self.settings.notice.replace("{retry_after}", seconds)
        return Drop(RATE_LIMITED, notice=notice or None)

    def _notice_due(self, key: str) -> bool:
        """Whether ``key`` gets a notice now (at most one per ``notice_interval_s``)."""
        now = self.clock()
        interval = self.settings.notice_interval_s
        noticed = self._noticed
        while noticed:  # oldest first: forget windows that are over, and bound the map
            oldest, at = next(iter(noticed.items()))
            if now - at < interval and len(noticed) < self.settings.max_keys:
                break
            del noticed[oldest]
        if key in noticed:
            return False
        noticed[key] = now
        return True


# -- access ----------------------------------------------------------------------------------


class PermissionStage:
    """Drop messages the access rules refuse, with a notice and an audit record.

    Args:
        policy: the rules.
        notice: sent to a refused sender; empty: refuse silently.
        audit: where ``access_denied`` records go, if anywhere.
    """

    name = "permission"

    def __init__(
        self, policy: AccessPolicy, *, notice: str, audit: AuditLog | None = None
    ) -> None:
        self.policy = policy
        self.notice = notice
        self.audit = audit

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        decision = await self.policy.decide(msg)
        if decision.allowed:
            return ctx
        ctx.log.debug("access denied: %s", decision.reason)
        if self.audit is not None:
            await self.audit.record_denied(
                platform=msg.platform,
                message_id=msg.message_id,
                conversation_id=msg.conversation.id,
                sender_id=msg.sender.id,
                rule=decision.reason,
            )
        return Drop(DENIED, notice=self.notice or None)


# -- admin commands --------------------------------------------------------------------------


class ModelPins(Protocol):
    """Which model a conversation is pinned to (``/model NAME``), by :func:`pin_key_for`."""

    def get(self, key: str) -> str | None:
        """The pinned model, or None."""
        ...

    def set(self, key: str, model: str) -> None:
        """Pin ``key`` to ``model``."""
        ...

    def clear(self, key: str) -> None:
        """Remove the pin of ``key`` (no error if there is none)."""
        ...


class MemoryModelPins:
    """:class:`ModelPins` in a dict: pins last until the process stops."""

    def __init__(self) -> None:
        self._pins: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        """The pinned model, or None."""
        return self._pins.get(key)

    def set(self, key: str, model: str) -> None:
        """Pin ``key`` to ``model``."""
        self._pins[key] = model

    def clear(self, key: str) -> None:
        """Remove the pin of ``key``."""
        self._pins.pop(key, None)


def pin_key_for(message: InboundMessage) -> str:
    """The pin key of a message's conversation: ``platform:conversation_id``."""
    return f"{message.platform}:{message.conversation.id}"


class AdminCommandStage:
    """Answer ``/status``, ``/reload`` and ``/model [NAME|clear]`` for admins.

    Args:
        policy: decides who is an admin.
        denied_notice: sent to a non-admin who tries an admin command.
        audit: where ``admin`` records go, if anywhere.
        status: returns a short status summary (``/status``).
        reload: reloads the configuration and returns a short summary (``/reload``); raises
            an :class:`~imrelay.errors.IMRelayError` or ``OSError`` when it fails.
        pins: the model pin store (``/model``).
        models: the configured model names ``/model`` accepts.
    """

    name = "admin"
    commands: Final = frozenset({"/status", "/reload", "/model"})

    def __init__(
        self,
        policy: AccessPolicy,
        *,
        denied_notice: str,
        audit: AuditLog | None = None,
        status: StatusProvider | None = None,
        reload: ReloadHook | None = None,
        pins: ModelPins | None = None,
        models: Collection[str] = (),
    ) -> None:
        self.policy = policy
        self.denied_notice = denied_notice
        self.audit = audit
        self.status = status
        self.reload = reload
        self.pins = pins
        self.models = sorted(models)

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        text = msg.text.strip()
        if not text.startswith("/"):
            return ctx
        head, _, rest = text.partition(" ")
        command, args = head.lower(), rest.strip()
        if command not in self.commands:
            return ctx
        if not self.policy.is_admin(msg):
            await self._audit(msg, command, args, "denied", "")
            return Drop(ADMIN_DENIED, notice=self.denied_notice or None)
        if command == "/status":
            outcome, reply = await self._run(self.status)
        elif command == "/reload":
            outcome, reply = await self._run(self.reload)
        else:
            outcome, reply = self._model(msg, args)
        await self._audit(msg, command, args, outcome, reply)
        return Drop(ADMIN_COMMAND, notice=reply)

    async def _run(self, action: Callable[[], Awaitable[str]] | None) -> tuple[AdminOutcome, str]:
        if action is None:
            return "failed", "This command is not available."
        try:
            return "ok", (await action())[:_MAX_REPLY]
        except (IMRelayError, OSError) as exc:
            return "failed", f"Failed: {str(exc) or type(exc).__name__}"[:_MAX_REPLY]

    def _model(self, msg: InboundMessage, args: str) -> tuple[AdminOutcome, str]:
        if self.pins is None:
            return "failed", "This command is not available."
        key = pin_key_for(msg)
        known = ", ".join(self.models)
        if not args:
            pinned = self.pins.get(key)
            where = f"pinned to {pinned}" if pinned else "not pinned (routing decides)"
            return "ok", f"This conversation is {where}. Models: {known}."
        if args in self.models:
            self.pins.set(key, args)
            return "ok", f"This conversation now uses {args}."
        if args.lower() in CLEAR_WORDS:
            self.pins.clear(key)
            return "ok", "This conversation is no longer pinned; routing decides the model."
        return "invalid", f"Unknown model. Models: {known}."

    async def _audit(
        self, msg: InboundMessage, command: str, args: str, outcome: AdminOutcome, detail: str
    ) -> None:
        if self.audit is not None:
            await self.audit.record_admin(
                platform=msg.platform,
                message_id=msg.message_id,
                conversation_id=msg.conversation.id,
                sender_id=msg.sender.id,
                action=command.lstrip("/"),
                args=args[:200],
                outcome=outcome,
                detail=detail,
            )


# -- the runner's audit hook -----------------------------------------------------------------


async def audit_settled(
    audit: AuditLog,
    ctx: TurnContext,
    outcome: str,
    reason: str,
    *,
    text: str | None = None,
    timings: dict[str, float] | None = None,
    mask: Callable[[str], str] | None = None,
) -> bool:
    """Write the ``message`` audit record of a settled message.

    The runner calls this once per message, after the final state is recorded. An audit
    write that fails is logged (the message's own outcome stands) and returns False.

    Args:
        audit: the log.
        ctx: the message's context after the pipeline.
        outcome: the final state (``replied``, ``dropped``, ``failed``).
        reason: the drop or failure reason.
        text: the text to hash; default: the message text as the pipeline left it (masked by
            the safety stage, if the message got that far).
        timings: seconds per stage, if the runner kept them.
        mask: applied to the text and answer before hashing (PII masking), so a message
            dropped before the safety stage is not hashed raw either (the message text the
            safety stage masked is not masked again).
    """
    msg = ctx.message
    gen = ctx.generation
    masked = text is None and ctx.text_masked
    text = msg.text if text is None else text
    answer = ctx.answer or None
    if mask is not None:
        if not masked:
            text = mask(text)
        answer = None if answer is None else mask(answer)
    try:
        await audit.record_message(
            platform=msg.platform,
            message_id=msg.message_id,
            conversation_id=msg.conversation.id,
            sender_id=msg.sender.id,
            outcome=outcome,
            reason=reason,
            model=ctx.model_name,
            text=text,
            answer=answer,
            received_at=msg.received_at,
            timings=timings,
            first_token_s=None if gen is None else gen.first_token_s,
            prompt_tokens=None if gen is None else gen.prompt_tokens,
            completion_tokens=None if gen is None else gen.completion_tokens,
            resumed=ctx.resumed,
        )
    except StoreError as exc:
        ctx.log.error("audit record could not be written: %s", exc)
        return False
    return True
