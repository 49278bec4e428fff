"""Sans-I/O DingTalk HTTP-mode cryptography: bot-message signatures and encrypted event callbacks.

Two unrelated schemes share this module (protocols/dingtalk.md §3):

* **Bot messages in HTTP mode** (§3.1): DingTalk POSTs the message with the request headers
  ``timestamp`` (epoch milliseconds) and ``sign`` = Base64(HMAC-SHA256(key = appSecret,
  message = ``timestamp + "\\n" + appSecret``)). :func:`sign_webhook` computes it and
  :func:`verify_webhook_signature` checks it, together with the timestamp window. The signature
  does not cover the body: the window (and the replay check in ``webhook.py``) is what limits a
  captured header pair.
* **Encrypted event subscription** (§3.2): :class:`DingTalkCallbackCrypto` verifies the SHA1
  signature over the sorted ``token``, ``timestamp``, ``nonce`` and ``encrypt`` strings and
  decrypts AES-256-CBC (IV = key[:16], PKCS#7 padding to 32-byte blocks) whose plaintext is
  ``random(16) ‖ length(4, big-endian) ‖ message ‖ ownerKey``; it also encrypts replies such as
  the ``success`` answer to the URL-check handshake.

Nothing here does I/O or reads a clock: the caller passes the current time. Every failure of
verification or decryption is a :class:`~imrelay.errors.SignatureError` (the request is not
authentic) or a :class:`~imrelay.errors.ProtocolError` (authentic but malformed), never another
exception. Messages never contain a secret, a signature or a plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import string
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from imrelay.errors import ProtocolError, SignatureError

__all__ = [
    "DingTalkCallbackCrypto",
    "DingTalkStaleTimestamp",
    "sign_webhook",
    "verify_webhook_signature",
]

_PAD_BLOCK: Final = 32  # DingTalk pads to 32 bytes, not the AES block size (§3.2)
_RANDOM_LEN: Final = 16
_LENGTH_LEN: Final = 4
_MAX_TIMESTAMP_DIGITS: Final = 18  # far beyond any epoch in ms; keeps int() cheap
_RANDOM_ALPHABET: Final = string.ascii_letters + string.digits


class DingTalkStaleTimestamp(SignatureError):
    """The request's ``timestamp`` is outside the accepted window (too old or in the future)."""


def _utf8(value: str) -> bytes:
    # surrogatepass: header and query values may carry lone surrogates; they must compare
    # unequal, not raise UnicodeEncodeError.
    return value.encode("utf-8", "surrogatepass")


def sign_webhook(app_secret: str, timestamp_ms: str | int) -> str:
    """Compute the ``sign`` header of an HTTP-mode bot message (§3.1).

    Args:
        app_secret: the app's AppSecret.
        timestamp_ms: the ``timestamp`` header, epoch milliseconds.

    Returns:
        Base64 of HMAC-SHA256(key = ``app_secret``, message = ``timestamp + "\\n" + app_secret``).
    """
    secret = _utf8(app_secret)
    digest = hmac.new(secret, _utf8(f"{timestamp_ms}\n{app_secret}"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_webhook_signature(
    timestamp: str | None,
    sign: str | None,
    app_secret: str,
    *,
    now_ms: int,
    window_s: float,
) -> None:
    """Check the ``timestamp`` and ``sign`` headers of an HTTP-mode bot message (§3.1).

    Args:
        timestamp: the ``timestamp`` header (epoch milliseconds as decimal digits), if any.
        sign: the ``sign`` header, if any.
        app_secret: the app's AppSecret.
        now_ms: the current time, epoch milliseconds.
        window_s: the largest accepted distance between ``timestamp`` and ``now_ms``, either way.

    Raises:
        DingTalkStaleTimestamp: the timestamp is outside the window.
        SignatureError: a header is missing, the timestamp is not a number, or the sign does not
            match (compared in constant time).
    """
    if not timestamp:
        raise SignatureError("missing timestamp header")
    if not sign:
        raise SignatureError("missing sign header")
    if not (
        timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= _MAX_TIMESTAMP_DIGITS
    ):
        raise SignatureError("timestamp header is not a number")
    if abs(now_ms - int(timestamp)) > window_s * 1000:
        raise DingTalkStaleTimestamp("timestamp outside the accepted window")
    expected = sign_webhook(app_secret, timestamp)
    if not hmac.compare_digest(expected.encode("ascii"), _utf8(sign)):
        raise SignatureError("sign mismatch")


class DingTalkCallbackCrypto:
    """The encrypted event-subscription codec (§3.2).

    Args:
        token: the console's callback token.
        aes_key: the console's EncodingAESKey (43 Base64 characters, 32 bytes once decoded).
        owner_key: the AppKey for app event subscriptions (the corpId or suiteKey for the
            legacy and third-party variants); decrypted messages must end with it.

    Raises:
        ValueError: ``token`` or ``owner_key`` is empty, or ``aes_key`` does not decode to
            32 bytes.
    """

    def __init__(self, token: str, aes_key: str, owner_key: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        if not owner_key:
            raise ValueError("owner_key must not be empty")
        key = b""
        if len(aes_key) == 43 and aes_key.isascii():
            try:
                key = base64.b64decode(aes_key + "=", validate=True)
            except (binascii.Error, ValueError):
                key = b""
        if len(key) != 32:
            raise ValueError("aes_key must be 43 base64 characters (the console's EncodingAESKey)")
        self._token = token
        self._key = key
        self._owner = _utf8(owner_key)

    def __repr__(self) -> str:
        return "DingTalkCallbackCrypto(token=***, aes_key=***)"

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        """Lowercase hex SHA1 of the lexicographically sorted token, timestamp, nonce, encrypt."""
        joined = "".join(sorted((self._token, timestamp, nonce, encrypt)))
        return hashlib.sha1(_utf8(joined)).hexdigest()  # nosec B324  # the platform's algorithm

    def decrypt_text(
        self,
        msg_signature: str | None,
        timestamp: str | None,
        nonce: str | None,
        encrypt: str | None,
    ) -> str:
        """Verify and decrypt one callback; return the plaintext message.

        Args:
            msg_signature: the ``msg_signature`` query parameter.
            timestamp: the ``timestamp`` query parameter.
            nonce: the ``nonce`` query parameter.
            encrypt: the body's ``encrypt`` field.

        Returns:
            The decrypted message (JSON text for events; the vector of §3.2 gives ``success``).

        Raises:
            SignatureError: a query parameter is missing, the signature does not match, or the
                message was encrypted for another owner key.
            ProtocolError: ``encrypt`` is missing, not Base64, or does not decrypt to the
                expected layout. No other exception is raised for any input.
        """
        if not encrypt:
            raise ProtocolError("missing encrypt")
        if not msg_signature:
            raise SignatureError("missing msg_signature")
        if not timestamp:
            raise SignatureError("missing timestamp")
        if not nonce:
            raise SignatureError("missing nonce")
        expected = self.signature(timestamp, nonce, encrypt)
        if not hmac.compare_digest(expected.encode("ascii"), _utf8(msg_signature)):
            raise SignatureError("signature mismatch")
        return self._open(encrypt)

    def decrypt(
        self,
        msg_signature: str | None,
        timestamp: str | None,
        nonce: str | None,
        encrypt: str | None,
    ) -> dict[str, Any]:
        """Like :meth:`decrypt_text`, and decode the plaintext as a JSON object (an event).

        Raises:
            SignatureError: as :meth:`decrypt_text`.
            ProtocolError: as :meth:`decrypt_text`, or the plaintext is not a JSON object.
        """
        text = self.decrypt_text(msg_signature, timestamp, nonce, encrypt)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError("decrypted message is not valid json") from exc
        if not isinstance(value, dict):
            raise ProtocolError("decrypted message is not a json object")
        return value

    def encrypt(
        self,
        plaintext: str,
        *,
        timestamp: str,
        nonce: str,
        random16: bytes | None = None,
    ) -> dict[str, str]:
        """Encrypt ``plaintext`` and sign it, as a callback reply (or a request, in tests).

        Args:
            plaintext: the message, e.g. ``success`` or an event's JSON text.
            timestamp: the reply's ``timeStamp``.
            nonce: the reply's ``nonce``.
            random16: the 16 leading random bytes (default: 16 random ASCII letters and digits).

        Returns:
            ``{"msg_signature", "timeStamp", "nonce", "encrypt"}`` (note the capital S).

        Raises:
            ValueError: ``random16`` is not 16 bytes long.
        """
        if random16 is None:
            random16 = "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(16)).encode()
        if len(random16) != _RANDOM_LEN:
            raise ValueError("random16 must be 16 bytes")
        message = _utf8(plaintext)
        body = random16 + len(message).to_bytes(_LENGTH_LEN, "big") + message + self._owner
        pad = _PAD_BLOCK - len(body) % _PAD_BLOCK
        body += bytes([pad]) * pad
        encryptor = self._cipher().encryptor()
        sealed = encryptor.update(body) + encryptor.finalize()
        encrypt = base64.b64encode(sealed).decode("ascii")
        return {
            "msg_signature": self.signature(timestamp, nonce, encrypt),
            "timeStamp": timestamp,
            "nonce": nonce,
            "encrypt": encrypt,
        }

    def reply_success(self, timestamp: str, nonce: str) -> dict[str, str]:
        """The encrypted ``success`` reply every callback (and the URL check) expects."""
        return self.encrypt("success", timestamp=timestamp, nonce=nonce)

    # -- internals -------------------------------------------------------------------------

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16]))

    def _open(self, encrypt: str) -> str:
        try:
            sealed = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError("encrypt is not base64") from exc
        if not sealed or len(sealed) % 16:
            raise ProtocolError("encrypt is not a whole number of aes blocks")
        decryptor = self._cipher().decryptor()
        body = decryptor.update(sealed) + decryptor.finalize()
        pad = body[-1]
        if not 1 <= pad <= _PAD_BLOCK or pad > len(body) or body[-pad:] != bytes([pad]) * pad:
            raise ProtocolError("bad padding in the decrypted message")
        body = body[:-pad]
        head = _RANDOM_LEN + _LENGTH_LEN
        if len(body) < head:
            raise ProtocolError("decrypted message is too short")
        length = int.from_bytes(body[_RANDOM_LEN:head], "big")
        if head + length > len(body):
            raise ProtocolError("decrypted message length exceeds the data")
        message, owner = body[head : head + length], body[head + length :]
        if not hmac.compare_digest(owner, self._owner):
            raise SignatureError("message was encrypted for another owner key")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("decrypted message is not utf-8") from exc
