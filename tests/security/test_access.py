"""Access rules: deny beats allow, who and where, admins, departments through a lookup."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from imrelay.errors import ConfigError
from imrelay.message import Conversation, InboundMessage, Sender
from imrelay.security.access import AccessPolicy, AccessRule, AccessSettings


def _msg(
    sender: str = "u1",
    conv: str = "g1",
    kind: str = "group",
    platform: str = "dingtalk",
    is_admin: bool = False,
) -> InboundMessage:
    return InboundMessage(
        platform=platform,
        message_id="m1",
        conversation=Conversation(id=conv, kind=kind),  # type: ignore[arg-type]
        sender=Sender(id=sender, is_admin=is_admin),
        kind="text",
        text="hi",
        received_at=0.0,
    )


def _policy(departments: dict[str, set[str]] | None = None, **rule: Any) -> AccessPolicy:
    settings = AccessSettings(platforms={"dingtalk": AccessRule(**rule)})
    lookup = None
    if departments is not None:

        async def lookup_fn(message: InboundMessage) -> frozenset[str]:
            return frozenset(departments.get(message.sender.id, set()))

        lookup = lookup_fn
    return AccessPolicy(settings, departments_of=lookup)


async def _reason(policy: AccessPolicy, message: InboundMessage) -> str:
    decision = await policy.decide(message)
    assert decision.allowed == (decision.reason == "")
    return decision.reason


async def test_access_default_lets_everyone_in() -> None:
    """Without rules every sender, group and direct chat is allowed."""
    policy = AccessPolicy(AccessSettings())
    assert await _reason(policy, _msg()) == ""
    assert await _reason(policy, _msg(kind="direct", conv="d1")) == ""
    assert not policy.is_admin(_msg())


async def test_access_deny_lists() -> None:
    """A denied user or group is refused with the rule's name."""
    policy = _policy(deny_users={"bad"}, deny_groups={"g-bad"})
    assert await _reason(policy, _msg(sender="bad")) == "denied_user"
    assert await _reason(policy, _msg(conv="g-bad")) == "denied_group"
    assert await _reason(policy, _msg(conv="g-bad", kind="direct")) == ""  # groups only
    assert await _reason(policy, _msg()) == ""


async def test_access_allow_users_restricts_who() -> None:
    """With allow_users only those users (and admins) get in, anywhere."""
    policy = _policy(allow_users={"u1"}, admins={"boss"})
    assert await _reason(policy, _msg(sender="u1")) == ""
    assert await _reason(policy, _msg(sender="u1", kind="direct", conv="d")) == ""
    assert await _reason(policy, _msg(sender="u2")) == "user_not_allowed"
    assert await _reason(policy, _msg(sender="boss")) == ""


async def test_access_allow_groups_restricts_where_not_direct() -> None:
    """With allow_groups only those groups are served; direct chats are unaffected."""
    policy = _policy(allow_groups={"g1"})
    assert await _reason(policy, _msg(conv="g1")) == ""
    assert await _reason(policy, _msg(conv="g2")) == "group_not_allowed"
    assert await _reason(policy, _msg(conv="d", kind="direct")) == ""
    no_direct = _policy(allow_direct=False)
    assert await _reason(no_direct, _msg(conv="d", kind="direct")) == "direct_not_allowed"
    assert await _reason(no_direct, _msg()) == ""


async def test_access_deny_wins_over_allow() -> None:
    """A user allowed by name but in a denied group is refused there."""
    policy = _policy(allow_users={"u1"}, deny_groups={"g-bad"})
    assert await _reason(policy, _msg(sender="u1", conv="g-bad")) == "denied_group"


async def test_access_platforms_have_their_own_rules() -> None:
    """A platform without its own rule uses the default rule."""
    settings = AccessSettings(
        platforms={"dingtalk": AccessRule(deny_users={"u1"})},
        default=AccessRule(allow_users={"only"}),
    )
    policy = AccessPolicy(settings)
    assert await _reason(policy, _msg(sender="u1")) == "denied_user"
    assert await _reason(policy, _msg(sender="u1", platform="other")) == "user_not_allowed"
    assert await _reason(policy, _msg(sender="only", platform="other")) == ""


async def test_access_admins_configured_or_trusted_from_platform() -> None:
    """Admins are the listed users, plus platform admins only when trusted; deny wins."""
    policy = _policy(admins={"boss"})
    assert policy.is_admin(_msg(sender="boss"))
    assert not policy.is_admin(_msg(sender="u1", is_admin=True))
    trusting = _policy(trust_platform_admins=True, deny_users={"ex"})
    assert trusting.is_admin(_msg(sender="u1", is_admin=True))
    assert not trusting.is_admin(_msg(sender="u1"))
    assert not trusting.is_admin(_msg(sender="ex", is_admin=True))


async def test_access_departments_through_the_lookup() -> None:
    """Department rules use the injected lookup, only for platforms that name departments."""
    policy = _policy(
        departments={"u1": {"100"}, "u2": {"200"}, "u3": {"100", "666"}},
        allow_departments={"100"},
        deny_departments={"666"},
    )
    assert await _reason(policy, _msg(sender="u1")) == ""
    assert await _reason(policy, _msg(sender="u2")) == "user_not_allowed"
    assert await _reason(policy, _msg(sender="u3")) == "denied_department"
    assert await _reason(policy, _msg(sender="u9")) == "user_not_allowed"
    mixed = _policy(departments={"u1": {"100"}}, allow_departments={"100"}, allow_users={"u5"})
    assert await _reason(mixed, _msg(sender="u5")) == ""
    assert await _reason(mixed, _msg(sender="u1")) == ""


async def test_access_lookup_not_called_without_department_rules() -> None:
    """The directory is not consulted for a platform whose rule has no departments."""
    calls: list[str] = []

    async def lookup(message: InboundMessage) -> frozenset[str]:
        calls.append(message.sender.id)
        return frozenset()

    settings = AccessSettings(
        platforms={"other": AccessRule(allow_departments={"1"})},
    )
    policy = AccessPolicy(settings, departments_of=lookup)
    assert await _reason(policy, _msg()) == ""
    assert calls == []
    assert await _reason(policy, _msg(platform="other")) == "user_not_allowed"
    assert calls == ["u1"]


def test_access_department_rules_without_lookup_fail_at_start() -> None:
    """Configuring departments with no directory lookup is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="directory lookup") as info:
        AccessPolicy(AccessSettings(platforms={"dt": AccessRule(deny_departments={"1"})}))
    assert info.value.key == "security.access.platforms.dt"
    with pytest.raises(ConfigError) as info:
        AccessPolicy(AccessSettings(default=AccessRule(allow_departments={"1"})))
    assert info.value.key == "security.access.default"


def test_access_rule_validation() -> None:
    """Contradictory lists are refused; numeric ids from YAML become strings."""
    rule = AccessRule.model_validate({"allow_departments": [12345, "x"], "admins": [7]})
    assert rule.allow_departments == frozenset({"12345", "x"})
    assert rule.admins == frozenset({"7"})
    with pytest.raises(ValidationError, match="both in allow_users and deny_users"):
        AccessRule(allow_users={"a"}, deny_users={"a"})
    with pytest.raises(ValidationError, match="admin"):
        AccessRule(admins={"a"}, deny_users={"a"})
    with pytest.raises(ValidationError):
        AccessRule.model_validate({"allow_users": [True]})
    with pytest.raises(ValidationError):
        AccessRule.model_validate({"allow_users": "abc"})
    with pytest.raises(ValidationError):
        AccessSettings.model_validate({"nope": 1})
