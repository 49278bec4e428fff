"""DingTalk error codes and the exceptions they map to.

Responses decode purely from HTTP status + JSON body (protocol doc §4). Two error styles exist:

* the new API (``api.dingtalk.com``) answers a non-2xx status with
  ``{"code": "<string>", "message": "…", "requestid": "…"}``;
* the legacy API, custom-robot webhooks and ``sessionWebhook`` answer **HTTP 200** with
  ``{"errcode": <int>, "errmsg": "…"}``, where any errcode other than 0 is an error.

Each exception class below registers the codes it stands for with :func:`register`
(the mautrix ``errors/request.py`` pattern); a code nobody registered becomes
:class:`UnknownDingTalkError`, retryable iff the HTTP status is 5xx. The tree::

    PlatformAPIError
    ├── AuthError
    │   ├── DingTalkInvalidCredentials   invalidClientIdOrSecret, 40096
    │   ├── DingTalkTokenInvalid         InvalidAuthentication, 40014 (refresh the token once)
    │   └── DingTalkMissingToken         AuthenticationFailed.MissingParameter
    ├── RateLimited
    │   ├── DingTalkQpsLimited           Forbidden.AccessDenied.QpsLimit…, 90018, 90006, 90005
    │   └── DingTalkWebhookThrottled     130101, 660026, 410100 (20 messages/min, then 10 min)
    ├── DingTalkSessionExpired           300001
    ├── DingTalkRequestRejected          permanent 4xx codes (bad parameters, robot disabled, …)
    ├── DingTalkServerError              unknownError (retryable)
    └── UnknownDingTalkError             anything else
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from imrelay.errors import AuthError, PlatformAPIError, RateLimited

__all__ = [
    "DingTalkInvalidCredentials",
    "DingTalkMissingToken",
    "DingTalkQpsLimited",
    "DingTalkRequestRejected",
    "DingTalkServerError",
    "DingTalkSessionExpired",
    "DingTalkTokenInvalid",
    "DingTalkWebhookThrottled",
    "ErrorRule",
    "UnknownDingTalkError",
    "error_from_response",
    "lookup",
    "register",
]

_MAX_MESSAGE_CHARS: Final = 200

_E = TypeVar("_E", bound=type[PlatformAPIError])


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """How one error code is raised.

    Attributes:
        cls: the exception class.
        retryable: whether trying again later may succeed (ignored by ``RateLimited``
            subclasses, which are always retryable).
        retry_after: seconds to wait, for ``RateLimited`` subclasses.
    """

    cls: type[PlatformAPIError]
    retryable: bool = False
    retry_after: float = 1.0


_REGISTRY: dict[str, ErrorRule] = {}


def register(
    *codes: str | int, retryable: bool = False, retry_after: float = 1.0
) -> Callable[[_E], _E]:
    """Class decorator: map ``codes`` to the decorated exception class.

    Args:
        codes: new-API string codes and/or legacy integer errcodes.
        retryable: whether the error may go away if the call is repeated later.
        retry_after: the wait in seconds for rate-limit classes.

    Raises:
        ValueError: a code is registered twice.
    """

    def decorator(cls: _E) -> _E:
        for code in codes:
            key = str(code)
            if key in _REGISTRY:
                raise ValueError(f"errcode {key!r} registered twice")
            _REGISTRY[key] = ErrorRule(cls, retryable=retryable, retry_after=retry_after)
        return cls

    return decorator


def lookup(code: str | int) -> ErrorRule | None:
    """Return the rule registered for ``code``, or ``None``."""
    return _REGISTRY.get(str(code))


@register("invalidClientIdOrSecret", 40096)
class DingTalkInvalidCredentials(AuthError):
    """The app key / app secret pair was refused: a configuration error."""


@register("InvalidAuthentication", 40014)
class DingTalkTokenInvalid(AuthError):
    """The access token is invalid or expired: refresh it once and try again."""


@register("AuthenticationFailed.MissingParameter")
class DingTalkMissingToken(AuthError):
    """The ``x-acs-dingtalk-access-token`` header was missing (a bug in the caller)."""


@register(
    "Forbidden.AccessDenied.QpsLimitForApi",
    "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
    90018,  # more than 40 QPS per app key per API
    retry_after=1.0,
)
@register(90006, 90005, retry_after=60.0)  # per-minute quotas
class DingTalkQpsLimited(RateLimited):
    """The API's QPS limit was hit; back off and retry."""


@register(130101, 660026, 410100, retry_after=60.0)
class DingTalkWebhookThrottled(RateLimited):
    """A robot webhook or sessionWebhook sent too many messages per minute."""


@register(300001)
class DingTalkSessionExpired(PlatformAPIError):
    """The sessionWebhook expired or never existed; reply through the OpenAPI instead."""


@register(
    "invalidParameter.robotCode.auth",
    "invalidParameter.msgParam.invalid",
    "invalidParameter.msgKey.invalid",
    "invalid.openConversationId",
    "resource.unavailable",
    "invalidParameter.userIds.overMax",
    "group.disbanded",
    "param.templateUnpublished",
    22,  # invalid method
    43004,  # bad Content-Type
    300005,  # robot token does not exist
    310000,  # keyword / timestamp / sign / IP check failed
    400102,  # robot disabled
    400105,  # unsupported msgtype
    400106,  # robot missing
)
class DingTalkRequestRejected(PlatformAPIError):
    """DingTalk refused the request for good; repeating it will not help."""


@register("unknownError", retryable=True)
class DingTalkServerError(PlatformAPIError):
    """DingTalk failed internally; retry with backoff."""


class UnknownDingTalkError(PlatformAPIError):
    """An error code no rule knows; retryable iff the HTTP status is 5xx."""


def _errcode(body: Mapping[str, Any]) -> str | int | None:
    """The error code of a body: new-API ``code`` or legacy ``errcode`` (``None``: none)."""
    for key in ("errcode", "code"):
        value = body.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | str):
            return value
    return None


def _is_zero(code: str | int) -> bool:
    return code == 0 or (isinstance(code, str) and code.strip() == "0")


def _message(body: Mapping[str, Any]) -> str:
    for key in ("message", "errmsg", "msg"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[:_MAX_MESSAGE_CHARS]
    return ""


def error_from_response(
    status: int, body: Mapping[str, Any] | None, *, platform: str
) -> PlatformAPIError | None:
    """Decode a DingTalk answer into an exception, or ``None`` for a success.

    A 2xx answer is a success unless its body carries a non-zero ``errcode`` (legacy API and
    webhooks report errors with HTTP 200). Any other status is an error.

    Args:
        status: the HTTP status.
        body: the JSON object of the answer, or ``None`` when it had none or was not an object.
        platform: the configured platform name, stored on the exception.

    Returns:
        The exception to raise, or ``None`` when the call succeeded.
    """
    body = body if isinstance(body, Mapping) else {}
    code = _errcode(body)
    if 200 <= status < 300:
        if "errcode" not in body or code is None or _is_zero(code):
            return None
        if isinstance(code, str) and code.isdigit():
            code = int(code)
    if code == 88 or code == "88":
        # legacy: errcode 88 wraps the real reason in sub_code (e.g. 40014, invalid token)
        sub = body.get("sub_code")
        if isinstance(sub, int | str) and not isinstance(sub, bool) and lookup(sub):
            code = sub
    rule = lookup(code) if code is not None else None
    detail = _message(body)
    text = f"dingtalk api error {code if code is not None else 'without code'} (http {status})"
    if detail:
        text = f"{text}: {detail}"
    server_failed = status >= 500
    if rule is None:
        if status == 429:
            return RateLimited(
                text, retry_after=1.0, platform=platform, errcode=code, status=status
            )
        return UnknownDingTalkError(
            text, platform=platform, errcode=code, status=status, retryable=server_failed
        )
    if issubclass(rule.cls, RateLimited):
        return rule.cls(
            text, retry_after=rule.retry_after, platform=platform, errcode=code, status=status
        )
    return rule.cls(
        text,
        platform=platform,
        errcode=code,
        status=status,
        retryable=rule.retryable or (server_failed and not issubclass(rule.cls, AuthError)),
    )
