"""The rule engine: which model answers a message, and why.

Theory of operation: :meth:`Router.pick` tries, in order, and the first that applies wins:

1. **pin**: an admin pinned the conversation with ``/model NAME`` (a model still configured);
   a pin is an explicit, per-conversation override, so it comes before the configured rules;
2. **rules**: ``routing.rules`` top to bottom. A rule matches when every key of its ``match``
   matches (an empty ``match`` matches everything); within a list, any member does. ``group``
   matches group conversations only; ``department`` needs the sender's departments (a
   directory lookup the caller does); ``keyword`` is a case-insensitive substring;
   ``regex`` is searched anywhere in the text; ``kind: code`` matches text messages in which
   code was detected (:mod:`imrelay.routing.code`), and ``kind: text`` matches every text
   message, code or not. A rule with a ``canary`` sends the conversation to the candidate
   model when it is in the canary (:mod:`imrelay.routing.canary`) and the canary was not rolled
   back; a promoted canary takes all of the rule's traffic;
3. **by_kind**: the message kind's model; a text message with code uses ``by_kind.code`` when
   set, else ``by_kind.text``;
4. **default**: ``routing.default``.

A picture (``image``, or a ``rich`` message holding pictures, which routing sees as ``image``),
a ``file`` or a ``video`` needs a model that takes it, so only the steps that name its kind
route it: rules whose ``match.kind`` lists it, then ``by_kind``. Pins and rules without that
kind leave it alone (they would hand a picture to a text model). Routed to ``default``, it has
no such model, and the media stage answers it with the unsupported notice.

The decision names the step (``rule``), a sentence for people (``reason``), the canary arm,
the rule's system prompt and the model's fallback chain. Code detection runs only when the
configuration can use it (``by_kind.code`` or a rule matching ``kind: code``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from imrelay.config import CanarySettings, RoutingSettings, RuleSettings
from imrelay.message import InboundMessage
from imrelay.pipeline.guard import ModelPins, pin_key_for
from imrelay.routing.canary import CanaryBook, canary_bucket
from imrelay.routing.code import CodeVerdict, detect_code

__all__ = ["MEDIA_KINDS", "RouteDecision", "Router", "Rule"]

CanaryArm = Literal["candidate", "baseline"]


MEDIA_KINDS: Final = frozenset({"image", "file", "video"})
"""Kinds only a model routed to them by name can take (see :meth:`Router.pick`)."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which model answers a message, and why.

    Attributes:
        model: the configured model name.
        rule: the step that decided: ``pin``, ``rule <name>``, ``by_kind.<kind>`` or
            ``default``.
        reason: what matched, for people (logs, ``imrelay route explain``).
        canary: ``candidate`` or ``baseline`` when the deciding rule has a canary, else None.
        system_prompt: the rule's system prompt (None: the model's own).
        kind: the message kind as routing saw it (``code`` for text with code).
        fallbacks: the models tried in turn if ``model`` fails (``routing.fallback``).
    """

    model: str
    rule: str
    reason: str
    canary: CanaryArm | None = None
    system_prompt: str | None = None
    kind: str = ""
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled ``routing.rules`` entry."""

    name: str
    model: str
    system_prompt: str | None
    canary: CanarySettings | None
    platforms: frozenset[str] = frozenset()
    conversations: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    departments: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    keywords: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    index: int = field(default=0, compare=False)

    @classmethod
    def from_settings(cls, index: int, rule: RuleSettings) -> Rule:
        """Compile ``routing.rules[index]``; an unnamed rule is called ``#<index + 1>``."""
        m = rule.match
        return cls(
            name=rule.name or f"#{index + 1}",
            model=rule.model,
            system_prompt=rule.system_prompt,
            canary=rule.canary,
            platforms=frozenset(m.platform),
            conversations=frozenset(m.conversation),
            groups=frozenset(m.group),
            users=frozenset(m.user),
            departments=frozenset(m.department),
            kinds=frozenset(m.kind),
            keywords=tuple(k.casefold() for k in m.keyword),
            regex=re.compile(m.regex) if m.regex is not None else None,
            index=index,
        )

    def check(
        self, message: InboundMessage, text: str, kind: str, departments: frozenset[str]
    ) -> tuple[bool, str]:
        """Whether the rule matches, and why: what matched, or the first key that did not."""
        why: list[str] = []
        conv = message.conversation
        checks: list[tuple[bool, bool, str, str]] = [
            (
                bool(self.platforms),
                message.platform in self.platforms,
                f"platform {message.platform}",
                "platform not listed",
            ),
            (
                bool(self.conversations),
                conv.id in self.conversations,
                "conversation listed",
                "conversation not listed",
            ),
            (
                bool(self.groups),
                conv.kind == "group" and conv.id in self.groups,
                "group listed",
                "not a listed group",
            ),
            (bool(self.users), message.sender.id in self.users, "user listed", "user not listed"),
            (
                bool(self.departments),
                bool(departments & self.departments),
                "department listed",
                "no listed department",
            ),
            (
                bool(self.kinds),
                kind in self.kinds or (kind == "code" and "text" in self.kinds),
                f"kind {kind}",
                f"kind {kind} not listed",
            ),
        ]
        for wanted, ok, yes, no in checks:
            if not wanted:
                continue
            if not ok:
                return False, no
            why.append(yes)
        if self.keywords:
            folded = text.casefold()
            hit = next((k for k in self.keywords if k in folded), None)
            if hit is None:
                return False, "no keyword"
            why.append(f"keyword {hit!r}")
        if self.regex is not None:
            if self.regex.search(text) is None:
                return False, "regex not found"
            why.append(f"regex {self.regex.pattern!r}")
        return True, ", ".join(why) or "matches everything"


class Router:
    """Picks the model for a message (see the module docstring).

    Args:
        routing: ``routing`` settings.
        pins: the ``/model`` pins; None: no pins.
        models: the configured model names; a pin to another name is ignored.
        canaries: the canary decisions; None: every canary is active.
        detect: the code detector.
    """

    def __init__(
        self,
        routing: RoutingSettings,
        *,
        pins: ModelPins | None = None,
        models: Collection[str] | None = None,
        canaries: CanaryBook | None = None,
        detect: Callable[[str], CodeVerdict] = detect_code,
    ) -> None:
        self.default = routing.default
        self.by_kind: Mapping[str, str] = {str(k): v for k, v in routing.by_kind.items()}
        self.fallback: Mapping[str, tuple[str, ...]] = {
            name: tuple(chain) for name, chain in routing.fallback.items()
        }
        self.rules = [Rule.from_settings(i, rule) for i, rule in enumerate(routing.rules)]
        self.pins = pins
        self.models = frozenset(models) if models is not None else None
        self.canaries = canaries
        self.detect = detect
        self.needs_code = "code" in self.by_kind or any("code" in r.kinds for r in self.rules)
        self.routed_kinds: frozenset[str] = frozenset(self.by_kind).union(
            *(r.kinds for r in self.rules)
        )
        """The kinds some step routes by name (``by_kind`` or a rule's ``kind``): a picture,
        file or video has a model only if its kind is one of them."""

    @property
    def uses_departments(self) -> bool:
        """Whether a rule matches departments (the caller must look them up)."""
        return any(rule.departments for rule in self.rules)

    def kind_of(self, message: InboundMessage, text: str) -> tuple[str, CodeVerdict | None]:
        """The kind routing uses (``code`` for text with code, ``image`` for a ``rich``
        message holding pictures), and the detector's verdict."""
        if message.kind == "rich" and any(a.kind == "image" for a in message.attachments):
            return "image", None
        if message.kind != "text" or not self.needs_code:
            return message.kind, None
        verdict = self.detect(text)
        return ("code" if verdict.is_code else "text"), verdict

    def pick(
        self,
        message: InboundMessage,
        text: str | None = None,
        *,
        departments: frozenset[str] = frozenset(),
    ) -> RouteDecision:
        """The model for ``message``.

        Args:
            message: the message.
            text: the text to match (default: the message's; the pipeline passes the text as
                earlier stages left it, e.g. masked).
            departments: the sender's department ids, for ``match.department``.
        """
        text = message.text if text is None else text
        kind, verdict = self.kind_of(message, text)
        detected = f" ({verdict.reason})" if verdict is not None else ""
        # a picture, file or video needs a model that takes it: only rules naming its kind,
        # then by_kind, route one (a pin or a rule without a kind would give it to a text model)
        media = kind in MEDIA_KINDS
        if self.pins is not None and not media:
            pinned = self.pins.get(pin_key_for(message))
            if pinned is not None and (self.models is None or pinned in self.models):
                return self._decide(pinned, "pin", "pinned by an admin with /model", kind)
        for rule in self.rules:
            if media and kind not in rule.kinds:
                continue
            matched, why = rule.check(message, text, kind, departments)
            if matched:
                reason = why + (detected if rule.kinds else "")
                return self._by_rule(rule, message, reason, kind)
        if kind == "code" and "code" in self.by_kind:
            return self._decide(self.by_kind["code"], "by_kind.code", f"code{detected}", kind)
        base = "text" if kind == "code" else kind
        if base in self.by_kind:
            why = f"message kind {base}" + (f"; code detected{detected}" if kind == "code" else "")
            return self._decide(self.by_kind[base], f"by_kind.{base}", why, kind)
        return self._decide(self.default, "default", f"no rule for kind {kind}{detected}", kind)

    def _by_rule(
        self, rule: Rule, message: InboundMessage, reason: str, kind: str
    ) -> RouteDecision:
        step = f"rule {rule.name}"
        canary = rule.canary
        if canary is None:
            return self._decide(rule.model, step, reason, kind, rule.system_prompt)
        arm: CanaryArm
        status = (
            self.canaries.status(rule.name, canary.model)
            if self.canaries is not None
            else "active"
        )
        if status == "rolled_back":
            model, arm, why = rule.model, "baseline", "canary rolled back"
        elif status == "promoted":
            model, arm, why = canary.model, "candidate", "canary promoted"
        else:
            conv = message.conversation
            bucket = canary_bucket(rule.name, message.platform, conv.id)
            if conv.kind == "group" and conv.id in canary.groups:
                model, arm, why = canary.model, "candidate", "canary group"
            elif bucket < canary.percent:
                model, arm, why = canary.model, "candidate", f"canary {canary.percent:g}%"
            else:
                model, arm, why = rule.model, "baseline", f"outside canary {canary.percent:g}%"
        return self._decide(model, step, f"{reason}; {why}", kind, rule.system_prompt, arm)

    def _decide(
        self,
        model: str,
        step: str,
        reason: str,
        kind: str,
        system_prompt: str | None = None,
        canary: CanaryArm | None = None,
    ) -> RouteDecision:
        return RouteDecision(
            model=model,
            rule=step,
            reason=reason,
            canary=canary,
            system_prompt=system_prompt,
            kind=kind,
            fallbacks=self.fallback.get(model, ()),
        )
