"""imrelay: a self-hosted gateway between private AI models and enterprise IM platforms."""

from __future__ import annotations

from imrelay.errors import IMRelayError
from imrelay.message import (
    Attachment,
    Conversation,
    ConversationKey,
    InboundMessage,
    OutboundReply,
    Sender,
)

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "Conversation",
    "ConversationKey",
    "IMRelayError",
    "InboundMessage",
    "OutboundReply",
    "Sender",
    "__version__",
]
