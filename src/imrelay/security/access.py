"""Access control: who may talk to the bot, where, and who may run admin commands.

Theory of operation: each platform (by its configured name) has an :class:`AccessRule`; a
platform without one uses ``security.access.default``. A message is judged in this order:

1. **Deny lists win.** The sender in ``deny_users``, the group in ``deny_groups`` or one of the
   sender's departments in ``deny_departments`` → denied.
2. **Who** (``allow_users``, ``allow_departments``): when either list is non-empty, the sender
   must be in ``allow_users`` or belong to one of ``allow_departments``. Admins always pass.
3. **Where** (``allow_groups``): when non-empty, a group message must come from one of those
   groups. Direct chats are not affected by group lists; set ``allow_direct: false`` to refuse
   them.

Empty lists mean "no restriction", so the default configuration lets everyone in.

Admins are the users in ``admins`` (and, with ``trust_platform_admins``, anyone the platform
marks as an organisation admin, e.g. DingTalk's ``isAdmin``). Only admins may run admin
commands (``/status``, ``/reload``, ``/model``).

Departments: DingTalk bot messages do not say which departments the sender belongs to; that
needs a directory lookup (DingTalk ``topapi/v2/user/get`` → ``dept_id_list``). Department rules
are therefore evaluated against an injected ``departments_of(message)`` coroutine, consulted
only for platforms whose rule names departments. Configuring department rules without a lookup
is a start-up error rather than a silent deny-all or allow-all.

Identifiers are the platform's own: user ids (DingTalk ``senderStaffId``), conversation ids
(DingTalk ``conversationId``) and department ids, compared as exact strings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imrelay.errors import ConfigError
from imrelay.message import InboundMessage

__all__ = [
    "ADMIN_DENIED_NOTICE",
    "DENIED_NOTICE",
    "AccessDecision",
    "AccessPolicy",
    "AccessRule",
    "AccessSettings",
    "DenyReason",
    "DepartmentLookup",
]

DENIED_NOTICE: Final = "Sorry, you are not allowed to use this assistant here."
ADMIN_DENIED_NOTICE: Final = "Sorry, only administrators can use this command."

DenyReason = Literal[
    "denied_user",
    "denied_group",
    "denied_department",
    "user_not_allowed",
    "group_not_allowed",
    "direct_not_allowed",
]
DepartmentLookup = Callable[[InboundMessage], Awaitable[frozenset[str]]]


class AccessRule(BaseModel):
    """The allow/deny lists of one platform (see the module docstring for how they combine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_users: frozenset[str] = frozenset()
    deny_users: frozenset[str] = frozenset()
    allow_groups: frozenset[str] = frozenset()
    deny_groups: frozenset[str] = frozenset()
    allow_departments: frozenset[str] = frozenset()
    deny_departments: frozenset[str] = frozenset()
    allow_direct: bool = True
    admins: frozenset[str] = frozenset()
    trust_platform_admins: bool = False

    @field_validator(
        "allow_users",
        "deny_users",
        "allow_groups",
        "deny_groups",
        "allow_departments",
        "deny_departments",
        "admins",
        mode="before",
    )
    @classmethod
    def _ids_as_text(cls, value: object) -> object:
        # YAML reads DingTalk department ids (and numeric user ids) as integers
        if isinstance(value, list | tuple | set | frozenset):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _no_contradictions(self) -> AccessRule:
        for what, allow, deny in (
            ("users", self.allow_users, self.deny_users),
            ("groups", self.allow_groups, self.deny_groups),
            ("departments", self.allow_departments, self.deny_departments),
        ):
            if allow & deny:
                raise ValueError(f"{len(allow & deny)} id(s) both in allow_{what} and deny_{what}")
        if self.admins & self.deny_users:
            raise ValueError(f"{len(self.admins & self.deny_users)} admin(s) also in deny_users")
        return self

    @property
    def uses_departments(self) -> bool:
        """Whether judging a message needs the sender's departments."""
        return bool(self.allow_departments or self.deny_departments)


class AccessSettings(BaseModel):
    """``security.access``: per-platform rules, the default rule and the notices.

    Attributes:
        platforms: rules by configured platform name.
        default: the rule of a platform not listed in ``platforms``.
        denied_notice: sent to a denied sender; empty: deny silently.
        admin_denied_notice: sent to a non-admin who tried an admin command.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    platforms: dict[str, AccessRule] = Field(default_factory=dict)
    default: AccessRule = Field(default_factory=AccessRule)
    denied_notice: str = DENIED_NOTICE
    admin_denied_notice: str = ADMIN_DENIED_NOTICE


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The verdict on one message; ``reason`` is empty when it is allowed."""

    allowed: bool
    reason: DenyReason | Literal[""] = ""


_ALLOWED: Final = AccessDecision(True)


class AccessPolicy:
    """Judges messages against :class:`AccessSettings`.

    Args:
        settings: the rules.
        departments_of: the sender's department ids (a directory lookup); required when a rule
            names departments, consulted only for those platforms.

    Raises:
        ConfigError: a rule names departments and no lookup was given.
    """

    def __init__(
        self, settings: AccessSettings, *, departments_of: DepartmentLookup | None = None
    ) -> None:
        self.settings = settings
        self.departments_of = departments_of
        if departments_of is None:
            rules: Mapping[str, AccessRule] = {"default": settings.default, **settings.platforms}
            for name, rule in rules.items():
                if rule.uses_departments:
                    key = "default" if name == "default" else f"platforms.{name}"
                    raise ConfigError(
                        "department rules need a directory lookup of the sender's departments, "
                        "which this platform does not provide yet",
                        key=f"security.access.{key}",
                    )

    def rule_for(self, platform: str) -> AccessRule:
        """The rule of a platform (its own, or the default)."""
        return self.settings.platforms.get(platform, self.settings.default)

    def is_admin(self, message: InboundMessage) -> bool:
        """Whether the sender may run admin commands."""
        rule = self.rule_for(message.platform)
        if message.sender.id in rule.deny_users:
            return False
        if message.sender.id in rule.admins:
            return True
        return rule.trust_platform_admins and message.sender.is_admin

    async def decide(self, message: InboundMessage) -> AccessDecision:
        """Judge ``message`` (see the module docstring for the order)."""
        rule = self.rule_for(message.platform)
        sender = message.sender.id
        group = message.conversation.kind == "group"
        departments: frozenset[str] = frozenset()
        if rule.uses_departments and self.departments_of is not None:
            departments = await self.departments_of(message)
        if sender in rule.deny_users:
            return AccessDecision(False, "denied_user")
        if group and message.conversation.id in rule.deny_groups:
            return AccessDecision(False, "denied_group")
        if departments & rule.deny_departments:
            return AccessDecision(False, "denied_department")
        if (
            (rule.allow_users or rule.allow_departments)
            and sender not in rule.allow_users
            and not departments & rule.allow_departments
            and not self.is_admin(message)
        ):
            return AccessDecision(False, "user_not_allowed")
        if group and rule.allow_groups and message.conversation.id not in rule.allow_groups:
            return AccessDecision(False, "group_not_allowed")
        if not group and not rule.allow_direct:
            return AccessDecision(False, "direct_not_allowed")
        return _ALLOWED
