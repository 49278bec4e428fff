"""Guard stages (rate limit, permission, admin commands) and the runner's audit hook."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from imrelay.errors import ConfigError
from imrelay.message import InboundMessage
from imrelay.models.base import Generation
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import Drop, Stage, TurnContext
from imrelay.pipeline.filter import DedupStage
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.guard import (
    ADMIN_COMMAND,
    ADMIN_DENIED,
    DENIED,
    RATE_LIMITED,
    AdminCommandStage,
    MemoryModelPins,
    PermissionStage,
    RateLimitStage,
    audit_settled,
    pin_key_for,
)
from imrelay.pipeline.model import GenerateStage
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.runner import Runner
from imrelay.pipeline.send import ReplySender, SendStage
from imrelay.security.access import AccessPolicy, AccessRule, AccessSettings
from imrelay.security.audit import AuditLog, read_sqlite, verify_records
from imrelay.security.ratelimit import RateLimitSettings
from imrelay.stores.base import MessageState
from imrelay.stores.memory import MemoryStore

PLATFORM = "dingtalk"
DENIED_TEXT = "not for you"
ADMIN_ONLY = "admins only"
ContextFactory = Callable[..., TurnContext]


class Monotonic:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    async with AuditLog(tmp_path / "audit.db", commit_interval_ms=0) as log:
        yield log


def _kinds(audit: AuditLog) -> list[str]:
    return [row["kind"] for row in read_sqlite(audit.path)]


def _records(audit: AuditLog, kind: str) -> list[dict[str, Any]]:
    import json

    return [json.loads(r["fields"]) for r in read_sqlite(audit.path) if r["kind"] == kind]


def _policy(**rule: Any) -> AccessPolicy:
    return AccessPolicy(AccessSettings(platforms={PLATFORM: AccessRule(**rule)}))


def _limits(**kw: Any) -> RateLimitSettings:
    base: dict[str, Any] = {
        "per_user": {"per_minute": 6, "burst": 5},
        "per_conversation": {"per_minute": 60, "burst": 50},
        "notice": "slow down, wait {retry_after}s",
        "notice_interval_s": 60,
    }
    base.update(kw)
    return RateLimitSettings.model_validate(base)


# -- RateLimitStage --------------------------------------------------------------------------


async def test_guard_rate_limit_flood_passes_burst_and_one_notice(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """Of 100 messages from one user, only the burst passes; one notice, one audit record."""
    clock = Monotonic()
    stage = RateLimitStage(_limits(), clock=clock, audit=audit)
    outcomes = [await stage(make_ctx(f"m{n}")) for n in range(100)]
    passed = [o for o in outcomes if isinstance(o, TurnContext)]
    drops = [o for o in outcomes if isinstance(o, Drop)]
    assert len(passed) == 5
    assert {d.reason for d in drops} == {RATE_LIMITED}
    notices = [d.notice for d in drops if d.notice]
    assert notices == ["slow down, wait 10s"]
    limited = _records(audit, "rate_limited")
    assert len(limited) == 1
    assert (limited[0]["scope"], limited[0]["sender"], limited[0]["message_id"]) == (
        "user",
        "staff-1",
        "m5",
    )
    clock.now += 10  # one token back
    assert isinstance(await stage(make_ctx("later")), TurnContext)
    assert await stage(make_ctx("again")) == Drop(RATE_LIMITED)  # same window: no new notice
    clock.now += 60
    again = [await stage(make_ctx(f"n{n}")) for n in range(10)]
    assert sum(isinstance(o, Drop) and o.notice is not None for o in again) == 1


async def test_guard_rate_limit_per_conversation(make_ctx: ContextFactory) -> None:
    """Many users in one conversation hit the conversation bucket; other chats are free."""
    stage = RateLimitStage(
        _limits(per_conversation={"per_minute": 1, "burst": 3}), clock=Monotonic()
    )
    outcomes = [await stage(make_ctx(f"m{n}", sender_id=f"u{n}")) for n in range(6)]
    assert [isinstance(o, TurnContext) for o in outcomes] == [True] * 3 + [False] * 3
    first_drop = outcomes[3]
    assert isinstance(first_drop, Drop)
    assert first_drop.notice == "slow down, wait 60s"
    assert isinstance(await stage(make_ctx("x", conv_id="other", sender_id="u9")), TurnContext)


async def test_guard_rate_limit_refused_user_keeps_conversation_tokens(
    make_ctx: ContextFactory,
) -> None:
    """A message refused for its sender takes no token from its conversation."""
    stage = RateLimitStage(
        _limits(
            per_user={"per_minute": 1, "burst": 1},
            per_conversation={"per_minute": 1, "burst": 2},
        ),
        clock=Monotonic(),
    )
    assert isinstance(await stage(make_ctx("a1", sender_id="a")), TurnContext)
    for n in range(5):
        assert isinstance(await stage(make_ctx(f"a{n + 2}", sender_id="a")), Drop)
    assert isinstance(await stage(make_ctx("b1", sender_id="b")), TurnContext)


async def test_guard_rate_limit_off_exempt_or_silent(make_ctx: ContextFactory) -> None:
    """Disabled limits pass everything; exempt senders pass; an empty notice limits silently."""
    off = RateLimitStage(_limits(enabled=False))
    none = RateLimitStage(_limits(per_user=None, per_conversation=None))
    for stage in (off, none):
        assert all([isinstance(await stage(make_ctx(f"m{n}")), TurnContext) for n in range(20)])
    exempt = RateLimitStage(
        _limits(), clock=Monotonic(), exempt=lambda m: m.sender.id == "staff-1"
    )
    assert all([isinstance(await exempt(make_ctx(f"m{n}")), TurnContext) for n in range(20)])
    silent = RateLimitStage(_limits(notice=""), clock=Monotonic())
    outcomes = [await silent(make_ctx(f"m{n}")) for n in range(7)]
    assert outcomes[5] == Drop(RATE_LIMITED)


async def test_guard_rate_limit_notice_window_map_is_bounded(make_ctx: ContextFactory) -> None:
    """Notice windows are forgotten past max_keys (memory stays bounded under many senders)."""
    clock = Monotonic()
    stage = RateLimitStage(
        _limits(per_user={"per_minute": 0.001, "burst": 1}, per_conversation=None, max_keys=2),
        clock=clock,
    )
    order = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("c", 1), ("c", 2)]
    outcomes = [await stage(make_ctx(f"{u}{n}", sender_id=u)) for u, n in order]
    noticed = [isinstance(o, Drop) and o.notice is not None for o in outcomes]
    assert noticed == [False, False, True, True, False, True]
    assert list(stage._noticed) == ["user:dingtalk:b", "user:dingtalk:c"]
    assert len(stage.limiters["user"]) == 2


# -- PermissionStage -------------------------------------------------------------------------


async def test_guard_permission_passes_allowed_and_drops_denied(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """A denied sender is dropped with the notice and an access_denied audit record."""
    stage = PermissionStage(_policy(deny_users={"bad"}), notice=DENIED_TEXT, audit=audit)
    ctx = make_ctx("ok")
    assert await stage(ctx) is ctx
    assert await stage(make_ctx("m2", sender_id="bad")) == Drop(DENIED, notice=DENIED_TEXT)
    denied = _records(audit, "access_denied")
    assert len(denied) == 1
    assert (denied[0]["sender"], denied[0]["rule"], denied[0]["conversation"]) == (
        "bad",
        "denied_user",
        "cid-1",
    )


async def test_guard_permission_silent_and_unaudited(make_ctx: ContextFactory) -> None:
    """With an empty notice and no audit log, a denial is a bare Drop."""
    stage = PermissionStage(_policy(allow_users={"someone"}), notice="")
    assert await stage(make_ctx()) == Drop(DENIED)


# -- AdminCommandStage -----------------------------------------------------------------------


def _admin(audit: AuditLog | None = None, **kw: Any) -> AdminCommandStage:
    return AdminCommandStage(_policy(admins={"boss"}), denied_notice=ADMIN_ONLY, audit=audit, **kw)


async def test_guard_admin_ignores_other_text_and_commands(make_ctx: ContextFactory) -> None:
    """Plain text and non-admin commands (``/help``) pass through untouched."""
    stage = _admin()
    for text in ("hello", "/help", "/reset now", "/statusx"):
        ctx = make_ctx(text=text)
        assert await stage(ctx) is ctx


async def test_guard_admin_refuses_non_admins_with_audit(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """A non-admin's admin command is refused with the notice and audited as denied."""
    reloads: list[int] = []

    async def reload() -> str:
        reloads.append(1)
        return "reloaded"

    stage = _admin(audit, reload=reload)
    assert await stage(make_ctx(text="/reload")) == Drop(ADMIN_DENIED, notice=ADMIN_ONLY)
    assert reloads == []
    (record,) = _records(audit, "admin")
    assert (record["action"], record["outcome"], record["sender"]) == (
        "reload",
        "denied",
        "staff-1",
    )
    silent = AdminCommandStage(_policy(), denied_notice="")
    assert await silent(make_ctx(text="/status")) == Drop(ADMIN_DENIED)


async def test_guard_admin_status_and_reload(make_ctx: ContextFactory, audit: AuditLog) -> None:
    """Admins get the status summary and the reload result; both are audited as ok."""

    async def status() -> str:
        return "2 platforms up, inbox 0"

    async def reload() -> str:
        return "configuration reloaded"

    stage = _admin(audit, status=status, reload=reload)
    boss = {"sender_id": "boss"}
    assert await stage(make_ctx(text="  /STATUS ", **boss)) == Drop(
        ADMIN_COMMAND, notice="2 platforms up, inbox 0"
    )
    assert await stage(make_ctx("m2", text="/reload", **boss)) == Drop(
        ADMIN_COMMAND, notice="configuration reloaded"
    )
    records = _records(audit, "admin")
    assert [(r["action"], r["outcome"]) for r in records] == [("status", "ok"), ("reload", "ok")]


async def test_guard_admin_failures_and_missing_hooks(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """A failing reload reports the error; commands without a hook say they are unavailable."""

    async def reload() -> str:
        raise ConfigError([("models.default.base_url", "field required")])

    async def broken_status() -> str:
        raise OSError("disk gone")

    stage = _admin(audit, reload=reload)
    drop = await stage(make_ctx(text="/reload", sender_id="boss"))
    assert drop == Drop(ADMIN_COMMAND, notice="Failed: models.default.base_url: field required")
    unavailable = await stage(make_ctx(text="/status", sender_id="boss"))
    assert unavailable == Drop(ADMIN_COMMAND, notice="This command is not available.")
    no_pins = await stage(make_ctx(text="/model big", sender_id="boss"))
    assert no_pins == Drop(ADMIN_COMMAND, notice="This command is not available.")
    status = _admin(status=broken_status)
    assert await status(make_ctx(text="/status", sender_id="boss")) == Drop(
        ADMIN_COMMAND, notice="Failed: disk gone"
    )
    assert [r["outcome"] for r in _records(audit, "admin")] == ["failed"] * 3


async def test_guard_admin_model_pins(make_ctx: ContextFactory, audit: AuditLog) -> None:
    """``/model`` shows, sets and clears the conversation's pin; unknown names are invalid."""
    pins = MemoryModelPins()
    stage = _admin(audit, pins=pins, models=["small", "big", "clear"])

    async def say(text: str) -> str | None:
        drop = await stage(make_ctx(text=text, sender_id="boss"))
        assert isinstance(drop, Drop)
        assert drop.reason == ADMIN_COMMAND
        return drop.notice

    key = pin_key_for(make_ctx().message)
    assert key == "dingtalk:cid-1"
    assert await say("/model") == (
        "This conversation is not pinned (routing decides). Models: big, clear, small."
    )
    assert await say("/model big") == "This conversation now uses big."
    assert pins.get(key) == "big"
    assert await say("/model") == "This conversation is pinned to big. Models: big, clear, small."
    assert await say("/model clear") == "This conversation now uses clear."  # a real model name
    assert await say("/model RESET") == (
        "This conversation is no longer pinned; routing decides the model."
    )
    assert pins.get(key) is None
    assert await say("/model huge") == "Unknown model. Models: big, clear, small."
    outcomes = [(r["args"], r["outcome"]) for r in _records(audit, "admin")]
    assert outcomes == [
        ("", "ok"),
        ("big", "ok"),
        ("", "ok"),
        ("clear", "ok"),
        ("RESET", "ok"),
        ("huge", "invalid"),
    ]
    pins.clear("never-pinned")


# -- the audit hook and the whole pipeline ---------------------------------------------------


async def test_guard_audit_settled_records_the_turn(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """The hook writes one message record with the outcome, model, usage and text hashes."""
    ctx = make_ctx(text="masked [PHONE]", resumed=True)
    ctx.model_name = "default"
    ctx.answer = "ok"
    ctx.generation = Generation(text="ok", first_token_s=0.1, prompt_tokens=5, completion_tokens=1)
    assert await audit_settled(audit, ctx, "replied", "", timings={"send": 0.01})
    bare = make_ctx("m2")
    assert await audit_settled(audit, bare, "dropped", "empty", text="override")
    raw = make_ctx("m3", text="call 13800138000")
    raw.answer = "ok 13800138000"
    assert await audit_settled(
        audit, raw, "dropped", "rate_limited", mask=lambda t: t.replace("13800138000", "[PHONE]")
    )
    first, second, third = _records(audit, "message")
    assert third["text_sha256"] == hashlib.sha256(b"call [PHONE]").hexdigest()
    assert third["answer_sha256"] == hashlib.sha256(b"ok [PHONE]").hexdigest()
    assert second["text_sha256"] == hashlib.sha256(b"override").hexdigest()
    assert (first["outcome"], first["model"], first["prompt_tokens"]) == ("replied", "default", 5)
    assert first["timings"] == {"send": 0.01}
    assert first["resumed"] is True
    assert "masked" not in str(first)
    assert (second["outcome"], second["reason"]) == ("dropped", "empty")
    assert "answer_sha256" not in second
    assert "model" not in second


async def test_guard_audit_settled_masks_a_text_only_once(
    make_ctx: ContextFactory, audit: AuditLog
) -> None:
    """A message text the safety stage masked is hashed as it is; the answer, a text given
    explicitly and a text the safety stage never saw are masked first."""
    masked: list[str] = []

    def mask(text: str) -> str:
        masked.append(text)
        return text.replace("13800138000", "[PHONE]")

    ctx = make_ctx(text="call [PHONE]")
    ctx.text_masked = True
    ctx.answer = "ok 13800138000"
    assert await audit_settled(audit, ctx, "replied", "", mask=mask)
    assert masked == ["ok 13800138000"]
    assert await audit_settled(audit, ctx, "dropped", "empty", text="13800138000", mask=mask)
    unseen = make_ctx("m2", text="call 13800138000")
    assert await audit_settled(audit, unseen, "dropped", "rate_limited", mask=mask)
    assert masked[1:] == ["13800138000", "ok 13800138000", "call 13800138000"]
    first, second, third = _records(audit, "message")
    assert first["text_sha256"] == hashlib.sha256(b"call [PHONE]").hexdigest()
    assert first["answer_sha256"] == hashlib.sha256(b"ok [PHONE]").hexdigest()
    assert second["text_sha256"] == hashlib.sha256(b"[PHONE]").hexdigest()
    assert third["text_sha256"] == hashlib.sha256(b"call [PHONE]").hexdigest()


async def test_guard_audit_settled_survives_a_failed_write(
    make_ctx: ContextFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An audit write that fails is logged and reported, not raised into the runner."""
    closed = AuditLog(tmp_path / "closed.db")
    assert not await audit_settled(closed, make_ctx(), "replied", "")
    assert "audit record could not be written" in caplog.text


async def test_guard_pipeline_denied_and_flooding_users_never_reach_the_model(
    store: MemoryStore,
    platform: Any,
    metrics: Metrics,
    clock: Any,
    make_backend: Callable[..., Any],
    make_message: Callable[..., InboundMessage],
    audit: AuditLog,
) -> None:
    """Through the runner: a denied user and a flood stop before the model; all is audited."""
    backend = make_backend("default", ["fine"])
    dedup = DedupStage(store)
    sender = ReplySender({PLATFORM: platform}, store, metrics, clock=clock, sleep=clock.sleep)
    policy = _policy(deny_users={"intruder"}, admins={"boss"})
    stages: list[Stage] = [
        dedup,
        RateLimitStage(
            _limits(per_user={"per_minute": 1, "burst": 3}), clock=Monotonic(), audit=audit
        ),
        PermissionStage(policy, notice=DENIED_TEXT, audit=audit),
        AdminCommandStage(policy, denied_notice=ADMIN_ONLY, audit=audit),
        RouteStage(default="default", by_kind={}),
        GenerateStage(
            {"default": backend}, system_prompts={}, metrics=metrics, failure_notice="failed"
        ),
        FormatStage(markdown={PLATFORM: False}),
        SendStage(sender, store, keep_turns=0, clock=clock),
    ]

    async def on_settled(ctx: TurnContext, state: MessageState, reason: str) -> None:
        await audit_settled(audit, ctx, state.value, reason)

    runner = Runner(
        stages,
        sender=sender,
        inbox=store,
        metrics=metrics,
        dedup=dedup,
        failure_notice="failed",
        wall_clock=clock,
        on_settled=on_settled,  # the audit record, as the gateway wires it
    )

    async def handle(message: InboundMessage) -> MessageState:
        assert await store.put(message)
        return await runner.handle(message)

    assert await handle(make_message("d1", sender_id="intruder")) is MessageState.DROPPED
    assert backend.prompts == []
    assert platform.texts == [DENIED_TEXT]
    states = [await handle(make_message(f"f{n}", sender_id="flooder")) for n in range(100)]
    assert states.count(MessageState.REPLIED) == 3
    assert len(backend.prompts) == 3
    assert platform.texts.count("fine") == 3
    assert sum("wait" in t for t in platform.texts) == 1
    assert await handle(make_message("s1", sender_id="x", text="/status")) is MessageState.DROPPED
    assert platform.texts[-1] == ADMIN_ONLY
    kinds = _kinds(audit)
    assert kinds.count("message") == 102
    assert kinds.count("access_denied") == 1
    assert kinds.count("rate_limited") == 1
    assert kinds.count("admin") == 1
    messages = _records(audit, "message")
    assert {m["reason"] for m in messages} == {"access_denied", "rate_limited", "", "admin_denied"}
    assert verify_records(read_sqlite(audit.path)).ok
