"""``imrelay route explain`` and ``imrelay canary status|promote|rollback|reset``.

Register with ``app.add_typer(route_app, name="route")`` and
``app.add_typer(canary_app, name="canary")``. The canary commands edit the decisions file a
running gateway reads (``<database>.canary.json``, see :mod:`imrelay.routing.canary`); the
gateway picks a change up within a few seconds and audits it. Exit codes: 0 done, 2 the
command could not run (configuration, unknown rule, no decisions file with ``memory://``
storage).
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from imrelay.cli._common import ConfigOption, err, load_or_exit
from imrelay.config import CanarySettings, Settings
from imrelay.errors import StoreError
from imrelay.message import Conversation, InboundMessage, Sender
from imrelay.routing.canary import (
    CanaryBook,
    CanaryDecision,
    CanaryStateFile,
    CanaryStatus,
    canary_state_path,
)
from imrelay.routing.rules import Router

__all__ = ["canary_app", "route_app"]

route_app = typer.Typer(
    help="Explain which model answers a message.", no_args_is_help=True, add_completion=False
)
canary_app = typer.Typer(
    help="Show and decide canary rollouts (routing.rules[].canary).",
    no_args_is_help=True,
    add_completion=False,
)

RuleOption = Annotated[
    str | None,
    typer.Option("--rule", help="The rule's name (optional when only one rule has a canary)."),
]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why, for the audit log and `canary status`.")
]
Kind = Literal["text", "image", "audio", "video", "file", "rich"]


def _state(settings: Settings) -> CanaryStateFile:
    try:
        path = canary_state_path(settings.storage.url)
    except ValueError as exc:
        err(f"error: storage.url: {exc}")
        raise typer.Exit(2) from None
    return CanaryStateFile(path)


def _book(settings: Settings) -> CanaryBook:
    book = CanaryBook(_state(settings))
    try:
        book.load()
    except StoreError as exc:
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    return book


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- route explain ----------------------------------------------------------------------------


@route_app.callback()
def _route() -> None:
    """Explain which model answers a message."""  # a group even with one command


@route_app.command("explain")
def explain(
    text: Annotated[str, typer.Option("--text", help="The message text.")],
    config: ConfigOption = None,
    group: Annotated[
        str | None, typer.Option("--group", help="A group conversation id (else a direct chat).")
    ] = None,
    conversation: Annotated[
        str | None, typer.Option("--conversation", help="A direct conversation id.")
    ] = None,
    user: Annotated[str, typer.Option("--user", help="The sender id.")] = "cli-user",
    platform: Annotated[
        str | None,
        typer.Option("--platform", help="A configured platform name (default: the first)."),
    ] = None,
    kind: Annotated[Kind, typer.Option("--kind", help="The message kind.")] = "text",
    department: Annotated[
        list[str] | None,
        typer.Option("--department", help="A department of the sender (repeatable)."),
    ] = None,
) -> None:
    """Print which rule picks which model for a message, and why."""
    settings = load_or_exit(config)
    book = _book(settings)
    router = Router(settings.routing, models=settings.models, canaries=book)
    name = platform or next(iter(settings.platforms), "dingtalk")
    if group is not None:
        conv = Conversation(id=group, kind="group")
    else:
        conv = Conversation(id=conversation or "cli-conversation", kind="direct")
    message = InboundMessage(
        platform=name,
        message_id="cli",
        conversation=conv,
        sender=Sender(id=user),
        kind=kind,
        text=text,
        received_at=time.time(),
        mentions_bot=True,
    )
    departments = frozenset(department or ())
    decision = router.pick(message, departments=departments)
    routed_kind, verdict = router.kind_of(message, text)
    lines = [
        f"model:          {decision.model}",
        f"decided by:     {decision.rule}",
        f"why:            {decision.reason}",
    ]
    detected = f" ({verdict.reason})" if verdict is not None else ""
    lines.append(f"kind:           {routed_kind}{detected}")
    if decision.canary is not None:
        lines.append(f"canary arm:     {decision.canary}")
    prompt = decision.system_prompt
    source = "the rule's"
    if prompt is None:
        prompt, source = settings.models[decision.model].system_prompt, "the model's"
    shown = "none" if not prompt else f"{source}: {_clip(prompt)}"
    lines.append(f"system prompt:  {shown}")
    chain = " -> ".join((decision.model, *decision.fallbacks))
    lines.append(f"fallbacks:      {chain if decision.fallbacks else 'none'}")
    lines.append("pins:           not visible here (kept by the running gateway)")
    if router.rules:
        lines.append("rules, in order:")
        for rule in router.rules:
            matched, why = rule.check(message, text, routed_kind, departments)
            mark = "MATCH" if matched else "no   "
            lines.append(f"  {rule.index + 1:>2}. {mark} {rule.name} -> {rule.model}: {why}")
            if matched:
                break
    print("\n".join(lines))


def _clip(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# -- canary -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CanaryRule:
    name: str
    baseline: str
    canary: CanarySettings


def _canary_rules(settings: Settings) -> list[_CanaryRule]:
    return [
        _CanaryRule(r.name, r.model, r.canary)
        for r in settings.routing.rules
        if r.canary is not None and r.name is not None  # config: a canary rule has a name
    ]


def _pick_rule(settings: Settings, name: str | None) -> _CanaryRule:
    rules = _canary_rules(settings)
    names = ", ".join(r.name for r in rules) or "none"
    if name is None:
        if len(rules) == 1:
            return rules[0]
        err(f"error: --rule is required; rules with a canary: {names}")
        raise typer.Exit(2)
    for rule in rules:
        if rule.name == name:
            return rule
    err(f"error: no rule named {name!r} has a canary; rules with a canary: {names}")
    raise typer.Exit(2)


@canary_app.command("status")
def status(config: ConfigOption = None, rule: RuleOption = None) -> None:
    """Show each canary: its traffic, its decision and its latest evaluation."""
    settings = load_or_exit(config)
    book = _book(settings)
    rules = [_pick_rule(settings, rule)] if rule is not None else _canary_rules(settings)
    if not rules:
        print("no routing rule has a canary")
        return
    path = book.store.path
    print(f"decisions file: {path if path is not None else 'none (memory:// storage)'}")
    for r in rules:
        c = r.canary
        state = book.status(r.name, c.model)
        traffic = [f"{c.percent:g}% of conversations"] if c.percent else []
        if c.groups:
            traffic.append(f"groups {', '.join(c.groups)}")
        print(f"\n{r.name}: {r.baseline} (baseline) vs {c.model} (candidate)")
        print(f"  status:     {state.replace('_', ' ')}")
        print(f"  traffic:    {' and '.join(traffic)} (while active)")
        print(
            f"  limits:     error rate +{c.max_error_rate_delta:.1%}, latency "
            f"x{c.max_latency_ratio:g}, at least {c.min_requests} requests per {c.window_s:g}s"
        )
        decision = book.decisions.get(r.name)
        if decision is not None and decision.candidate == c.model:
            print(f"  decided:    {_when(decision.at)} by {decision.by}: {decision.reason}")
        elif decision is not None:
            print(f"  ignored:    a decision about {decision.candidate}, not this candidate")
        evaluation = book.evaluations.get(r.name)
        if evaluation is not None:
            print(
                f"  evaluated:  {_when(float(evaluation.get('at', 0)))}: {_evaluation(evaluation)}"
            )


def _evaluation(data: dict[str, Any]) -> str:
    def side(name: str) -> str:
        s = data.get(name) or {}
        latency = s.get("mean_latency_s")
        mean = "n/a" if latency is None else f"{latency:.3f}s"
        return (
            f"{name} {s.get('requests', 0):.0f} requests, "
            f"{float(s.get('error_rate', 0)):.1%} errors, mean {mean}"
        )

    return f"{data.get('verdict')}: {data.get('reason')} [{side('candidate')}; {side('baseline')}]"


def _decide(config: Path | None, name: str | None, status: CanaryStatus, reason: str) -> None:
    settings = load_or_exit(config)
    rule = _pick_rule(settings, name)
    store = _state(settings)
    if store.path is None:
        err(
            "error: storage.url is memory://: canary decisions are kept by the running "
            "gateway only and cannot be changed from here"
        )
        raise typer.Exit(2)
    decision = CanaryDecision(rule.canary.model, status, time.time(), _actor(), reason)
    try:
        store.decide(rule.name, decision)
    except StoreError as exc:
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    if status == "promoted":
        done = f"promoted: all of its traffic now goes to {rule.canary.model}"
    elif status == "rolled_back":
        done = f"rolled back: all of its traffic now goes to {rule.baseline}"
    else:
        done = "reset: the canary is active again"
    print(f"{rule.name}: {done} (a running gateway applies it within a few seconds)")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in the environment or the passwd file
        return "cli"


@canary_app.command("promote")
def promote(
    config: ConfigOption = None,
    rule: RuleOption = None,
    reason: ReasonOption = "promoted by an operator",
) -> None:
    """Send all of the rule's traffic to the candidate."""
    _decide(config, rule, "promoted", reason)


@canary_app.command("rollback")
def rollback(
    config: ConfigOption = None,
    rule: RuleOption = None,
    reason: ReasonOption = "rolled back by an operator",
) -> None:
    """Send all of the rule's traffic back to its own model."""
    _decide(config, rule, "rolled_back", reason)


@canary_app.command("reset")
def reset(
    config: ConfigOption = None,
    rule: RuleOption = None,
    reason: ReasonOption = "reset by an operator",
) -> None:
    """Make the canary active (and evaluated) again after a promotion or a rollback."""
    _decide(config, rule, "active", reason)
