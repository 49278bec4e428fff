"""Tier 1 tests of the sans-I/O DingTalk HTTP-mode crypto (protocols/dingtalk.md §3.1, §3.2)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrelay.errors import ProtocolError, SignatureError
from imrelay.platforms.dingtalk.crypto import (
    DingTalkCallbackCrypto,
    DingTalkStaleTimestamp,
    sign_webhook,
    verify_webhook_signature,
)

# §3.1 vector (computed locally and recorded in the protocol doc).
SECRET = "test-app-secret"
TS = "1700000000000"
SIGN = "dhJB8TJ0cHPEbwpUauugV2Wz8v4qlWoO+C42nEhJW+c="
NOW_MS = 1_700_000_000_000
HOUR = 3600.0

# §3.2 official vector.
TOKEN = "123456"
AES_KEY = "1234567890123456789012345678901234567890123"
OWNER = "dingsnotzck6pm5veliw"
VEC_SIGNATURE = "9a95a004dd16f5c307e849b994173f76aa26e5eb"
VEC_TIMESTAMP = "1614767836"
VEC_NONCE = "A7Co0cJLMzIDtMMI"
VEC_ENCRYPT = (
    "YvkvaGe4hQxd3VxRmEty0dVlnCOAqwf56xwTRHDHoOURqhalbmBJQk5FNcRk42Gl5T0YQXZNwpwWSm1xAFJ5ZA=="
)

CRYPTO = DingTalkCallbackCrypto(TOKEN, AES_KEY, OWNER)
KEY = base64.b64decode(AES_KEY + "=")


def seal(raw: bytes) -> str:
    """AES-256-CBC-encrypt ``raw`` (already padded) with the vector's key, as DingTalk would."""
    encryptor = Cipher(algorithms.AES(KEY), modes.CBC(KEY[:16])).encryptor()
    return base64.b64encode(encryptor.update(raw) + encryptor.finalize()).decode()


def pad32(raw: bytes) -> bytes:
    """PKCS#7 padding to 32-byte blocks."""
    n = 32 - len(raw) % 32
    return raw + bytes([n]) * n


def layout(message: bytes, owner: bytes = OWNER.encode(), length: int | None = None) -> bytes:
    """``random16 ‖ len ‖ message ‖ owner``, padded."""
    size = len(message) if length is None else length
    return pad32(b"R" * 16 + size.to_bytes(4, "big") + message + owner)


def open_signed(encrypt: str, timestamp: str = "1", nonce: str = "n") -> str:
    """Decrypt ``encrypt`` under a correct signature."""
    return CRYPTO.decrypt_text(
        CRYPTO.signature(timestamp, nonce, encrypt), timestamp, nonce, encrypt
    )


# -- §3.1 bot-message signature ---------------------------------------------------------------


def test_sign_webhook_matches_test_vector() -> None:
    """The sign of the recorded vector is reproduced, from a string or an int timestamp."""
    assert sign_webhook(SECRET, TS) == SIGN
    assert sign_webhook(SECRET, int(TS)) == SIGN


def test_sign_webhook_is_hmac_of_timestamp_and_secret() -> None:
    """The sign changes with the timestamp and with the secret."""
    assert sign_webhook(SECRET, int(TS) + 1) != SIGN
    assert sign_webhook(SECRET + "x", TS) != SIGN


@pytest.mark.parametrize("offset_ms", [0, 3_600_000, -3_600_000, 1234])
def test_verify_webhook_signature_accepts_within_window(offset_ms: int) -> None:
    """A correct sign whose timestamp is at most one window away (either way) verifies."""
    verify_webhook_signature(TS, SIGN, SECRET, now_ms=NOW_MS + offset_ms, window_s=HOUR)


@pytest.mark.parametrize("offset_ms", [3_600_001, -3_600_001, 86_400_000])
def test_verify_webhook_signature_rejects_outside_window(offset_ms: int) -> None:
    """An old or a future timestamp is a stale-timestamp signature error."""
    with pytest.raises(DingTalkStaleTimestamp, match="outside the accepted window"):
        verify_webhook_signature(TS, SIGN, SECRET, now_ms=NOW_MS + offset_ms, window_s=HOUR)


@pytest.mark.parametrize(
    ("timestamp", "sign", "reason"),
    [
        (None, SIGN, "missing timestamp"),
        ("", SIGN, "missing timestamp"),
        (TS, None, "missing sign"),
        (TS, "", "missing sign"),
        ("abc", SIGN, "not a number"),
        ("-1700000000000", SIGN, "not a number"),
        ("1700000000000.0", SIGN, "not a number"),
        ("１７００", SIGN, "not a number"),
        ("9" * 40, SIGN, "not a number"),
    ],
)
def test_verify_webhook_signature_rejects_missing_or_malformed(
    timestamp: str | None, sign: str | None, reason: str
) -> None:
    """A missing header or a timestamp that is not plain digits is a signature error."""
    with pytest.raises(SignatureError, match=reason) as info:
        verify_webhook_signature(timestamp, sign, SECRET, now_ms=NOW_MS, window_s=HOUR)
    assert not isinstance(info.value, DingTalkStaleTimestamp)


@pytest.mark.parametrize(
    ("sign", "secret"),
    [
        (SIGN, "other-secret"),
        (SIGN[:-2] + "A=", SECRET),
        (SIGN.lower(), SECRET),
        ("签名" + SIGN, SECRET),
        ("\udcff", SECRET),
    ],
)
def test_verify_webhook_signature_rejects_mismatch(sign: str, secret: str) -> None:
    """A wrong secret or a tampered (even non-ASCII) sign is a mismatch, never another error."""
    with pytest.raises(SignatureError, match="sign mismatch"):
        verify_webhook_signature(TS, sign, secret, now_ms=NOW_MS, window_s=HOUR)


def test_verify_webhook_signature_error_hides_secret() -> None:
    """No failure message contains the secret or the sign."""
    for ts, sign in ((TS, "bad"), (None, SIGN), ("1", SIGN)):
        with pytest.raises(SignatureError) as info:
            verify_webhook_signature(ts, sign, SECRET, now_ms=NOW_MS, window_s=HOUR)
        assert SECRET not in str(info.value)
        assert SIGN not in str(info.value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.none() | st.text(max_size=30) | st.integers(0, 10**19).map(str),
    st.none() | st.text(max_size=60) | st.just(SIGN),
    st.integers(-(10**15), 10**15),
)
def test_verify_webhook_signature_any_input_verifies_or_raises_signature_error(
    timestamp: str | None, sign: str | None, now_ms: int
) -> None:
    """Any header values either verify or raise SignatureError, never another exception."""
    try:
        verify_webhook_signature(timestamp, sign, SECRET, now_ms=now_ms, window_s=HOUR)
    except SignatureError:
        return
    assert timestamp == TS
    assert sign == SIGN


# -- §3.2 encrypted callbacks ------------------------------------------------------------------


def test_callback_crypto_official_vector_signature_matches() -> None:
    """The SHA1 over the sorted fields reproduces the vector's msg_signature."""
    assert CRYPTO.signature(VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT) == VEC_SIGNATURE
    joined = "".join(sorted([TOKEN, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT]))
    assert hashlib.sha1(joined.encode()).hexdigest() == VEC_SIGNATURE


def test_callback_crypto_official_vector_decrypts_to_success() -> None:
    """The official vector verifies and decrypts to ``success``."""
    text = CRYPTO.decrypt_text(VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT)
    assert text == "success"


def test_callback_crypto_decrypt_requires_json_object() -> None:
    """``decrypt`` (events) refuses a plaintext that is not a JSON object, like ``success``."""
    with pytest.raises(ProtocolError, match="not valid json"):
        CRYPTO.decrypt(VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT)
    reply = CRYPTO.encrypt("[1, 2]", timestamp="1", nonce="n")
    with pytest.raises(ProtocolError, match="not a json object"):
        CRYPTO.decrypt(reply["msg_signature"], "1", "n", reply["encrypt"])


def test_callback_crypto_encrypt_round_trips_event() -> None:
    """An encrypted event decrypts back to the same JSON object, under the reply's signature."""
    event = {"EventType": "user_add_org", "UserId": ["张三", "bob"], "TimeStamp": 1}
    reply = CRYPTO.encrypt(json.dumps(event, ensure_ascii=False), timestamp="1700", nonce="abc")
    assert set(reply) == {"msg_signature", "timeStamp", "nonce", "encrypt"}
    assert (reply["timeStamp"], reply["nonce"]) == ("1700", "abc")
    assert reply["msg_signature"] == CRYPTO.signature("1700", "abc", reply["encrypt"])
    assert CRYPTO.decrypt(reply["msg_signature"], "1700", "abc", reply["encrypt"]) == event


def test_callback_crypto_encrypt_matches_official_vector_layout() -> None:
    """Encrypting ``success`` with the vector's random prefix reproduces the vector exactly."""
    encryptor = Cipher(algorithms.AES(KEY), modes.CBC(KEY[:16])).decryptor()
    raw = encryptor.update(base64.b64decode(VEC_ENCRYPT)) + encryptor.finalize()
    reply = CRYPTO.encrypt("success", timestamp=VEC_TIMESTAMP, nonce=VEC_NONCE, random16=raw[:16])
    assert reply == {
        "msg_signature": VEC_SIGNATURE,
        "timeStamp": VEC_TIMESTAMP,
        "nonce": VEC_NONCE,
        "encrypt": VEC_ENCRYPT,
    }


@pytest.mark.parametrize("size", [0, 1, 11, 12, 13, 44, 100])
def test_callback_crypto_encrypt_pads_to_32_byte_blocks(size: int) -> None:
    """The ciphertext is a whole number of 32-byte blocks; a full block of padding when aligned."""
    message = "x" * size
    reply = CRYPTO.encrypt(message, timestamp="1", nonce="n")
    sealed = base64.b64decode(reply["encrypt"])
    assert len(sealed) % 32 == 0
    unpadded = 16 + 4 + size + len(OWNER)
    assert len(sealed) - unpadded == 32 - unpadded % 32
    assert open_signed(reply["encrypt"]) == message


def test_callback_crypto_encrypt_random_prefix_is_fresh_ascii() -> None:
    """Without ``random16`` each encryption uses a new 16-character alphanumeric prefix."""
    first = CRYPTO.encrypt("success", timestamp="1", nonce="n")["encrypt"]
    second = CRYPTO.encrypt("success", timestamp="1", nonce="n")["encrypt"]
    assert first != second
    decryptor = Cipher(algorithms.AES(KEY), modes.CBC(KEY[:16])).decryptor()
    raw = decryptor.update(base64.b64decode(first)) + decryptor.finalize()
    assert raw[:16].decode("ascii").isalnum()


def test_callback_crypto_reply_success_decrypts_to_success() -> None:
    """The reply for a callback carries an encrypted ``success``."""
    reply = CRYPTO.reply_success("1614767836", "nonce1")
    assert reply["timeStamp"] == "1614767836"
    assert CRYPTO.decrypt_text(
        reply["msg_signature"], "1614767836", "nonce1", reply["encrypt"]
    ) == ("success")


def test_callback_crypto_encrypt_rejects_wrong_random_length() -> None:
    """``random16`` must be exactly 16 bytes."""
    with pytest.raises(ValueError, match="16 bytes"):
        CRYPTO.encrypt("x", timestamp="1", nonce="n", random16=b"short")


@pytest.mark.parametrize(
    ("args", "error", "reason"),
    [
        ((VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, None), ProtocolError, "missing encrypt"),
        ((VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, ""), ProtocolError, "missing encrypt"),
        ((None, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT), SignatureError, "missing msg_signature"),
        ((VEC_SIGNATURE, None, VEC_NONCE, VEC_ENCRYPT), SignatureError, "missing timestamp"),
        ((VEC_SIGNATURE, VEC_TIMESTAMP, "", VEC_ENCRYPT), SignatureError, "missing nonce"),
        (("0" * 40, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT), SignatureError, "signature mismatch"),
        ((VEC_SIGNATURE, "1614767837", VEC_NONCE, VEC_ENCRYPT), SignatureError, "mismatch"),
        ((VEC_SIGNATURE, VEC_TIMESTAMP, "other", VEC_ENCRYPT), SignatureError, "mismatch"),
        ((VEC_SIGNATURE.upper(), VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT), SignatureError, "mis"),
        ((VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, "A" + VEC_ENCRYPT[1:]), SignatureError, "mis"),
        (("签", VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT), SignatureError, "mismatch"),
    ],
)
def test_callback_crypto_rejects_missing_or_tampered_fields(
    args: tuple[str | None, str | None, str | None, str | None],
    error: type[Exception],
    reason: str,
) -> None:
    """Missing parameters and any change to a signed field are refused before decryption."""
    with pytest.raises(error, match=reason):
        CRYPTO.decrypt_text(*args)


def test_callback_crypto_rejects_other_token_and_owner() -> None:
    """A different token fails the signature; a different owner key fails after decryption."""
    other_token = DingTalkCallbackCrypto("654321", AES_KEY, OWNER)
    with pytest.raises(SignatureError, match="signature mismatch"):
        other_token.decrypt_text(VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT)
    other_owner = DingTalkCallbackCrypto(TOKEN, AES_KEY, "dingotherapp")
    with pytest.raises(SignatureError, match="another owner key"):
        other_owner.decrypt_text(VEC_SIGNATURE, VEC_TIMESTAMP, VEC_NONCE, VEC_ENCRYPT)


@pytest.mark.parametrize(
    ("encrypt", "reason"),
    [
        ("not base64!!", "not base64"),
        ("YWJj", "whole number of aes blocks"),  # 3 bytes
        (base64.b64encode(b"\x00" * 20).decode(), "whole number of aes blocks"),
        ("签名", "not base64"),
        (seal(b"R" * 31 + b"\x00"), "bad padding"),
        (seal(b"R" * 31 + b"\x21"), "bad padding"),
        (seal(b"R" * 30 + b"\x01\x02"), "bad padding"),
        (seal(pad32(b"R" * 10)), "too short"),
        (seal(layout(b"success", length=1000)), "length exceeds"),
        (seal(layout(b"\xff\xfe")), "not utf-8"),
    ],
)
def test_callback_crypto_rejects_malformed_ciphertext(encrypt: str, reason: str) -> None:
    """A correctly signed but malformed ``encrypt`` is a ProtocolError naming the problem."""
    with pytest.raises(ProtocolError, match=reason):
        open_signed(encrypt)


def test_callback_crypto_owner_key_must_match_exactly() -> None:
    """A trailing owner key that is a prefix or an extension of ours is refused."""
    with pytest.raises(SignatureError, match="another owner key"):
        open_signed(seal(layout(b"success", owner=OWNER[:-1].encode())))
    with pytest.raises(SignatureError, match="another owner key"):
        open_signed(seal(layout(b"success", owner=OWNER.encode() + b"x")))
    assert open_signed(seal(layout(b"success"))) == "success"


@pytest.mark.parametrize(
    ("token", "aes_key", "owner", "reason"),
    [
        ("", AES_KEY, OWNER, "token"),
        (TOKEN, AES_KEY, "", "owner_key"),
        (TOKEN, AES_KEY[:-1], OWNER, "aes_key"),
        (TOKEN, AES_KEY + "4", OWNER, "aes_key"),
        (TOKEN, "!" * 43, OWNER, "aes_key"),
        (TOKEN, "é" * 43, OWNER, "aes_key"),
    ],
)
def test_callback_crypto_constructor_validates_keys(
    token: str, aes_key: str, owner: str, reason: str
) -> None:
    """An empty token or owner key, or an aes_key that is not 32 bytes, is a ValueError."""
    with pytest.raises(ValueError, match=reason) as info:
        DingTalkCallbackCrypto(token, aes_key, owner)
    assert AES_KEY not in str(info.value)


def test_callback_crypto_repr_hides_secrets() -> None:
    """The repr shows neither the token nor the AES key."""
    text = repr(CRYPTO)
    assert TOKEN not in text
    assert AES_KEY not in text


_ERRORS = (SignatureError, ProtocolError)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.none() | st.text(max_size=50),
    st.none() | st.text(max_size=20),
    st.none() | st.text(max_size=20),
    st.none() | st.text(max_size=120),
)
def test_callback_crypto_any_input_decrypts_or_raises(
    msg_signature: str | None, timestamp: str | None, nonce: str | None, encrypt: str | None
) -> None:
    """Any four strings (or None) give a value or SignatureError/ProtocolError."""
    with contextlib.suppress(_ERRORS):
        assert isinstance(CRYPTO.decrypt(msg_signature, timestamp, nonce, encrypt), dict)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
def test_callback_crypto_any_signed_ciphertext_decrypts_or_raises(encrypt: str) -> None:
    """Any ``encrypt`` under a correct signature gives a value or SignatureError/ProtocolError."""
    with contextlib.suppress(_ERRORS):
        event = CRYPTO.decrypt(CRYPTO.signature("1", "n", encrypt), "1", "n", encrypt)
        assert isinstance(event, dict)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 8).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n)))
def test_callback_crypto_any_decrypted_layout_decrypts_or_raises(raw: bytes) -> None:
    """Any plaintext blocks, encrypted and signed, give a value or SignatureError/ProtocolError."""
    with contextlib.suppress(_ERRORS):
        text = open_signed(seal(raw))
        assert text.encode() in raw  # only ever the message framed inside the blocks


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.binary(min_size=16, max_size=16))
def test_callback_crypto_encrypt_decrypt_round_trip(message: str, random16: bytes) -> None:
    """Any text encrypted with any random prefix decrypts to itself."""
    reply = CRYPTO.encrypt(message, timestamp="42", nonce="nonce", random16=random16)
    assert CRYPTO.decrypt_text(reply["msg_signature"], "42", "nonce", reply["encrypt"]) == message
