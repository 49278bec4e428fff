"""Sans-I/O DingTalk Stream protocol: frames, ACKs and the connection handshake.

Theory of operation (protocol doc §1): the client POSTs its credentials and subscriptions to
``/v1.0/gateway/connections/open`` (:func:`build_open_request`), gets back a WebSocket endpoint
and a single-use ticket (:func:`parse_open_response`), and connects to
:func:`build_ws_url`. The server then pushes JSON text frames (:func:`parse_frame`) of type
``SYSTEM`` (``ping``, ``disconnect``), ``EVENT`` or ``CALLBACK``; the client answers each one
(except ``disconnect``) with an ACK that echoes ``headers.messageId`` (:func:`build_ack`,
:func:`build_ping_ack`). Nothing here does I/O: ``stream.py`` moves the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, get_args
from urllib.parse import quote_plus

from imrelay import _json
from imrelay.errors import AuthError, PlatformAPIError, ProtocolError
from imrelay.platforms.dingtalk.errors import error_from_response

__all__ = [
    "DEFAULT_SUBSCRIPTIONS",
    "MAX_FRAME_BYTES",
    "TOPIC_BOT_DELEGATE",
    "TOPIC_BOT_MESSAGE",
    "TOPIC_DISCONNECT",
    "TOPIC_PING",
    "Frame",
    "FrameType",
    "build_ack",
    "build_open_request",
    "build_ping_ack",
    "build_ws_url",
    "parse_frame",
    "parse_open_response",
]

TOPIC_BOT_MESSAGE: Final = "/v1.0/im/bot/messages/get"
TOPIC_BOT_DELEGATE: Final = "/v1.0/im/bot/messages/delegate"
TOPIC_PING: Final = "ping"
TOPIC_DISCONNECT: Final = "disconnect"

# Only bot messages: subscribing EVENT "*" would oblige us to ACK events with a status (§1.4).
DEFAULT_SUBSCRIPTIONS: Final[tuple[dict[str, str], ...]] = (
    {"type": "CALLBACK", "topic": TOPIC_BOT_MESSAGE},
)

MAX_FRAME_BYTES: Final = 1024 * 1024

FrameType = Literal["SYSTEM", "EVENT", "CALLBACK"]
_FRAME_TYPES: Final[frozenset[str]] = frozenset(get_args(FrameType))


def _loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` that only ever raises :class:`ProtocolError`."""
    try:
        return _json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid json") from exc


@dataclass(frozen=True, slots=True)
class Frame:
    """One downstream frame (§1.3).

    Attributes:
        type: ``SYSTEM``, ``EVENT`` or ``CALLBACK``.
        topic: ``headers.topic``, e.g. :data:`TOPIC_BOT_MESSAGE` or :data:`TOPIC_PING`.
        message_id: ``headers.messageId``, to echo in the ACK ("" for ``disconnect`` without one).
        headers: every header, values as strings.
        data: the raw JSON text of ``data`` ("" when absent).
    """

    type: FrameType
    topic: str
    message_id: str
    headers: Mapping[str, str] = field(hash=False)
    data: str

    def data_json(self) -> dict[str, Any]:
        """Decode :attr:`data`; an empty string decodes to ``{}``.

        Raises:
            ProtocolError: ``data`` is not a JSON object.
        """
        if not self.data:
            return {}
        value = _loads(self.data, "frame data")
        if not isinstance(value, dict):
            raise ProtocolError("frame data is not a json object")
        return value


def _header_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return ""
    raise ProtocolError("a header value is not a scalar")


def parse_frame(raw: str | bytes, *, platform: str = "") -> Frame:
    """Parse one WebSocket text frame.

    Header values should all be strings (§1.3); other scalars are turned into strings, except
    for ``topic`` and ``messageId``, which must be strings. ``messageId`` is required except in
    a ``SYSTEM`` ``disconnect`` frame.

    Args:
        raw: the frame as received.
        platform: the configured platform name, stored on errors.

    Returns:
        The frame.

    Raises:
        ProtocolError: the frame is too big, not JSON, or not shaped like a frame. No other
            exception is raised for any input.
    """
    try:
        return _parse_frame(raw)
    except ProtocolError as exc:
        exc.platform = platform
        raise


def _parse_frame(raw: str | bytes) -> Frame:
    if isinstance(raw, str):
        if len(raw) > MAX_FRAME_BYTES or (
            len(raw) * 4 > MAX_FRAME_BYTES
            and len(raw.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES
        ):
            raise ProtocolError(f"frame larger than {MAX_FRAME_BYTES} bytes")
        text = raw
    else:
        if len(raw) > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame larger than {MAX_FRAME_BYTES} bytes")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("frame is not utf-8") from exc
    obj = _loads(text, "frame")
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a json object")
    ftype = obj.get("type")
    if not isinstance(ftype, str) or ftype not in _FRAME_TYPES:
        raise ProtocolError("frame type is missing or unknown")
    raw_headers = obj.get("headers")
    if not isinstance(raw_headers, dict):
        raise ProtocolError("frame headers are missing or not an object")
    headers = {str(k): _header_value(v) for k, v in raw_headers.items()}
    topic = raw_headers.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("frame topic is missing or not a string")
    message_id = raw_headers.get("messageId")
    if message_id is None and ftype == "SYSTEM" and topic == TOPIC_DISCONNECT:
        message_id = ""
    elif not isinstance(message_id, str) or not message_id:
        raise ProtocolError("frame message id is missing or not a string")
    data = obj.get("data", "")
    if data is None:
        data = ""
    if not isinstance(data, str):
        raise ProtocolError("frame data is not a string")
    return Frame(
        type=ftype,  # type: ignore[arg-type]  # checked against _FRAME_TYPES above
        topic=topic,
        message_id=message_id,
        headers=MappingProxyType(headers),
        data=data,
    )


def _ack(message_id: str, data_text: str, code: int, message: str) -> str:
    # the standard library's spacing: byte for byte the ACKs the official SDK sends (§1.4)
    return json.dumps(
        {
            "code": code,
            "headers": {"contentType": "application/json", "messageId": message_id},
            "message": message,
            "data": data_text,
        }
    )


def build_ack(
    message_id: str,
    data: Mapping[str, Any] | None = None,
    *,
    code: int = 200,
    message: str = "OK",
) -> str:
    """Build an upstream ACK (§1.4).

    Args:
        message_id: the ``messageId`` of the frame being acknowledged.
        data: the ACK payload, JSON-encoded into the ``data`` string (``{}`` when ``None``).
        code: 200 OK, 400 bad request, 404 topic not handled, 500 client error.
        message: a short status text.

    Returns:
        The JSON text to send as a WebSocket text frame.
    """
    return _ack(message_id, json.dumps(dict(data or {})), code, message)


def build_ping_ack(frame: Frame) -> str:
    """Answer a ``SYSTEM`` ``ping`` by echoing its ``data`` (the opaque token) verbatim (§1.5)."""
    return _ack(frame.message_id, frame.data or "{}", 200, "OK")


def build_open_request(
    client_id: str,
    client_secret: str,
    *,
    ua: str,
    local_ip: str = "127.0.0.1",
    subscriptions: Sequence[Mapping[str, str]] = DEFAULT_SUBSCRIPTIONS,
) -> dict[str, Any]:
    """Build the JSON body of ``POST /v1.0/gateway/connections/open`` (§1.1).

    Args:
        client_id: the app key.
        client_secret: the app secret (the body must never be logged).
        ua: the client's name and version.
        local_ip: reported for DingTalk's diagnostics.
        subscriptions: ``{"type", "topic"}`` pairs.

    Returns:
        The request body.
    """
    return {
        "clientId": client_id,
        "clientSecret": client_secret,
        "subscriptions": [{"type": s["type"], "topic": s["topic"]} for s in subscriptions],
        "ua": ua,
        "localIp": local_ip,
    }


def parse_open_response(status: int, body: bytes, *, platform: str = "") -> tuple[str, str]:
    """Read the answer to the open-connection call (§1.1).

    Args:
        status: the HTTP status.
        body: the raw response body.
        platform: the configured platform name, stored on errors.

    Returns:
        ``(endpoint, ticket)``.

    Raises:
        AuthError: the credentials were refused.
        PlatformAPIError: any other failure; retryable for 5xx and 429.
    """
    try:
        obj: Any = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    if status == 200:
        if isinstance(obj, dict):
            endpoint, ticket = obj.get("endpoint"), obj.get("ticket")
            if isinstance(endpoint, str) and endpoint and isinstance(ticket, str) and ticket:
                return endpoint, ticket
        raise PlatformAPIError(
            "open-connection response lacks endpoint or ticket", platform=platform, status=status
        )
    error = error_from_response(status, obj if isinstance(obj, dict) else None, platform=platform)
    if error is None:  # a 2xx other than 200: not what the gateway answers
        error = PlatformAPIError(
            f"unexpected open-connection status {status}", platform=platform, status=status
        )
    if status == 401 and not isinstance(error, AuthError):
        error = AuthError(str(error), platform=platform, errcode=error.errcode, status=status)
    raise error


def build_ws_url(endpoint: str, ticket: str) -> str:
    """Append the ticket to the endpoint (§1.2), URL-encoded with ``quote_plus``."""
    if "?" not in endpoint:
        sep = "?"
    elif endpoint.endswith(("?", "&")):
        sep = ""
    else:
        sep = "&"
    return f"{endpoint}{sep}ticket={quote_plus(ticket)}"
