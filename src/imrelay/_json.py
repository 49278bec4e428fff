"""JSON for the per-message path: orjson, with the standard library's answer where they differ.

Every message is parsed and encoded several times on its way through the gateway (the Stream
frame and its ACK, the inbox record, the model request and its streamed chunks, the reply);
orjson does each in a fraction of the standard library's time.

Where the two differ, the standard library decides:

* :func:`loads` falls back to ``json.loads`` when orjson refuses the text: ``NaN`` and
  ``Infinity``, numbers beyond a double's range, and escaped lone surrogates (a model that
  splits an emoji's UTF-16 halves across chunks) are accepted as before. A text neither
  accepts raises what the standard library raises: ``json.JSONDecodeError``, or
  ``UnicodeDecodeError`` for bytes that are not text (both ``ValueError``).
* :func:`dumps` and :func:`dumpb` fall back to ``json.dumps`` for what orjson cannot write (keys
  that are not strings, integers beyond 64 bits, strings holding lone surrogates), and for
  dataclasses and datetimes, which the standard library refuses as before. The output is
  compact (no spaces) and keeps non-ASCII characters as they are.

Three differences remain: integers beyond 64 bits are read as floats (no platform or model
field imrelay reads is one); a float that is not a number (NaN, infinities) is written as
``null``, which is valid JSON, where ``json.dumps`` writes ``NaN``, which is not; and UUIDs and
plain enums are written (as their text and value) where ``json.dumps`` refuses them.

The signed audit chain, the Stream ACKs (byte for byte those of the official SDK) and the
configuration and secret files keep the standard library: their exact bytes matter.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumpb", "dumps", "loads"]

# dataclasses and datetimes go to the standard library, which refuses them, as before
_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def loads(text: str | bytes) -> Any:
    """Parse a JSON document; raises ``ValueError`` (``json.JSONDecodeError``) when invalid."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def dumpb(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON bytes.

    Raises:
        TypeError: a value is not JSON-serialisable.
        UnicodeEncodeError: a string holds a lone surrogate (it cannot be UTF-8).
    """
    try:
        return orjson.dumps(obj, default=_refuse, option=_OPTIONS)
    except TypeError:
        return _fallback(obj).encode()


def dumps(obj: Any) -> str:
    """Encode ``obj`` as compact JSON text; a lone surrogate is kept (as by ``json.dumps``).

    Raises:
        TypeError: a value is not JSON-serialisable.
    """
    try:
        return orjson.dumps(obj, default=_refuse, option=_OPTIONS).decode()
    except TypeError:
        return _fallback(obj)


def _refuse(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not handled by orjson here")


def _fallback(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
