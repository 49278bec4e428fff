"""Exceptions raised by imrelay.

The tree::

    IMRelayError
    ├── ConfigError(key)
    ├── PlatformError(platform)
    │   ├── ProtocolError
    │   ├── SignatureError
    │   ├── ConnectionLost(code, reason)
    │   └── PlatformAPIError(errcode, message)
    │       ├── AuthError
    │       └── RateLimited(retry_after)
    ├── ModelError(backend)
    │   ├── ModelTimeout
    │   ├── ModelUnavailable
    │   └── ModelResponseError
    ├── StoreError
    └── PipelineError(stage)

Messages are lowercase and never contain a secret.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "ConnectionLost",
    "IMRelayError",
    "ModelError",
    "ModelResponseError",
    "ModelTimeout",
    "ModelUnavailable",
    "PipelineError",
    "PlatformAPIError",
    "PlatformError",
    "ProtocolError",
    "RateLimited",
    "SignatureError",
    "StoreError",
]


class IMRelayError(Exception):
    """Base class of every exception imrelay raises on purpose."""


class ConfigError(IMRelayError):
    """The configuration is invalid.

    Attributes:
        problems: one ``(key_path, message)`` pair per problem found.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, key: str = "") -> None:
        if isinstance(problems, str):
            problems = [(key, problems)]
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in problems))

    @property
    def key(self) -> str:
        """The key path of the first problem."""
        return self.problems[0][0] if self.problems else ""


class PlatformError(IMRelayError):
    """Something went wrong talking to an IM platform."""

    def __init__(self, message: str, *, platform: str = "") -> None:
        super().__init__(message)
        self.platform = platform


class ProtocolError(PlatformError):
    """A frame or payload did not follow the platform's protocol."""


class SignatureError(PlatformError):
    """A request's signature or timestamp did not verify."""


class ConnectionLost(PlatformError):
    """A long connection closed or went silent."""

    def __init__(
        self, message: str, *, platform: str = "", code: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, platform=platform)
        self.code = code
        self.reason = reason


class PlatformAPIError(PlatformError):
    """A platform REST call answered with an error.

    Attributes:
        errcode: the platform's error code (string or number as the platform gives it).
        status: the HTTP status, when there was one.
        retryable: whether trying again later may succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        platform: str = "",
        errcode: str | int | None = None,
        status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, platform=platform)
        self.errcode = errcode
        self.status = status
        self.retryable = retryable


class AuthError(PlatformAPIError):
    """Credentials were refused or an access token is invalid."""


class RateLimited(PlatformAPIError):
    """The platform throttled the call; ``retry_after`` is in seconds."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        platform: str = "",
        errcode: str | int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(
            message, platform=platform, errcode=errcode, status=status, retryable=True
        )
        self.retry_after = retry_after


class ModelError(IMRelayError):
    """A model backend failed."""

    def __init__(self, message: str, *, backend: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.backend = backend
        self.retryable = retryable


class ModelTimeout(ModelError):
    """The model did not answer within its timeout."""


class ModelUnavailable(ModelError):
    """The model endpoint could not be reached or is overloaded."""


class ModelResponseError(ModelError):
    """The model answered with an error or an unreadable response."""


class StoreError(IMRelayError):
    """The durable store failed."""


class PipelineError(IMRelayError):
    """A pipeline stage failed unexpectedly."""

    def __init__(self, message: str, *, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage
