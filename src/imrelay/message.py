"""Neutral value types shared by every platform, store and pipeline stage.

A connector turns a platform payload into an :class:`InboundMessage`; the pipeline answers
with :class:`OutboundReply` parts. Both round-trip through plain JSON (``to_dict`` /
``from_dict``) so the durable inbox can keep them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = [
    "Attachment",
    "Conversation",
    "ConversationKey",
    "ConversationKind",
    "InboundMessage",
    "Ingress",
    "MessageKind",
    "OutboundReply",
    "Sender",
]

ConversationKind = Literal["direct", "group"]
MessageKind = Literal["text", "image", "audio", "video", "file", "rich", "unsupported"]
Ingress = Literal["stream", "webhook"]

_MESSAGE_KINDS: frozenset[str] = frozenset(get_args(MessageKind))
_CONVERSATION_KINDS: frozenset[str] = frozenset(get_args(ConversationKind))
_INGRESS: frozenset[str] = frozenset(get_args(Ingress))


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identifies one conversation (or one sender within it) for ordering and context."""

    platform: str
    conversation_id: str
    sender_id: str = ""

    def __str__(self) -> str:
        base = f"{self.platform}:{self.conversation_id}"
        return f"{base}:{self.sender_id}" if self.sender_id else base


@dataclass(frozen=True, slots=True)
class Conversation:
    """Where a message was written."""

    id: str
    kind: ConversationKind
    title: str = ""


@dataclass(frozen=True, slots=True)
class Sender:
    """Who wrote a message. ``id`` is the platform's stable user id (DingTalk staffId)."""

    id: str
    name: str = ""
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class Attachment:
    """A handle to download a media item later; never the bytes themselves."""

    kind: MessageKind
    download_code: str
    name: str = ""
    text: str = ""  # e.g. DingTalk's speech recognition for audio


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message handed to imrelay by a platform.

    ``reply_to`` holds the platform's reply handle (for DingTalk: ``session_webhook`` and
    ``expires_at_ms``); ``dedup_keys`` lists every id under which a redelivery of this message
    may arrive (DingTalk: ``msgId`` and the frame ``messageId``).
    """

    platform: str
    message_id: str
    conversation: Conversation
    sender: Sender
    kind: MessageKind
    text: str
    received_at: float
    ingress: Ingress = "stream"
    mentions_bot: bool = False
    attachments: tuple[Attachment, ...] = ()
    reply_to: Mapping[str, Any] = field(default_factory=dict)
    dedup_keys: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> ConversationKey:
        """The conversation this message belongs to."""
        return ConversationKey(self.platform, self.conversation.id)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form of this message."""
        return {
            "platform": self.platform,
            "message_id": self.message_id,
            "conversation": {
                "id": self.conversation.id,
                "kind": self.conversation.kind,
                "title": self.conversation.title,
            },
            "sender": {
                "id": self.sender.id,
                "name": self.sender.name,
                "is_admin": self.sender.is_admin,
            },
            "kind": self.kind,
            "text": self.text,
            "received_at": self.received_at,
            "ingress": self.ingress,
            "mentions_bot": self.mentions_bot,
            "attachments": [
                {"kind": a.kind, "download_code": a.download_code, "name": a.name, "text": a.text}
                for a in self.attachments
            ],
            "reply_to": dict(self.reply_to),
            "dedup_keys": list(self.dedup_keys),
            "raw": dict(self.raw),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InboundMessage:
        """Rebuild a message from :meth:`to_dict` output.

        Raises:
            ValueError: a field is missing or has a value outside its closed set.
        """
        try:
            conv = data["conversation"]
            snd = data["sender"]
            kind = str(data["kind"])
            conv_kind = str(conv["kind"])
            ingress = str(data.get("ingress", "stream"))
            if kind not in _MESSAGE_KINDS:
                raise ValueError(f"unknown message kind {kind!r}")
            if conv_kind not in _CONVERSATION_KINDS:
                raise ValueError(f"unknown conversation kind {conv_kind!r}")
            if ingress not in _INGRESS:
                raise ValueError(f"unknown ingress {ingress!r}")
            return cls(
                platform=str(data["platform"]),
                message_id=str(data["message_id"]),
                conversation=Conversation(
                    id=str(conv["id"]),
                    kind=conv_kind,  # type: ignore[arg-type]
                    title=str(conv.get("title", "")),
                ),
                sender=Sender(
                    id=str(snd["id"]),
                    name=str(snd.get("name", "")),
                    is_admin=bool(snd.get("is_admin", False)),
                ),
                kind=kind,  # type: ignore[arg-type]
                text=str(data.get("text", "")),
                received_at=float(data["received_at"]),
                ingress=ingress,  # type: ignore[arg-type]
                mentions_bot=bool(data.get("mentions_bot", False)),
                attachments=tuple(
                    Attachment(
                        kind=a["kind"],
                        download_code=str(a["download_code"]),
                        name=str(a.get("name", "")),
                        text=str(a.get("text", "")),
                    )
                    for a in data.get("attachments", ())
                ),
                reply_to=dict(data.get("reply_to", {})),
                dedup_keys=tuple(str(k) for k in data.get("dedup_keys", ())),
                raw=dict(data.get("raw", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed message record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class OutboundReply:
    """One part of an answer, sent through the handle of the message it answers.

    Attributes:
        text: the body.
        markdown: send as markdown rather than plain text.
        title: the title shown in chat lists for markdown messages.
        mention_sender: @-mention the sender (groups).
        part: 0-based index when an answer is split into several messages.
    """

    text: str
    markdown: bool = False
    title: str = ""
    mention_sender: bool = False
    part: int = 0
