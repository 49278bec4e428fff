"""Tests for imrelay._json: the same answers as the standard library, faster."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imrelay import _json
from imrelay.models import openai_compat

documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(documents)
def test_encodes_and_parses_like_the_standard_library(doc: Any) -> None:
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert _json.loads(text) == json.loads(text)
    assert _json.loads(text.encode("utf-8", "surrogatepass")) == json.loads(text)
    assert json.loads(_json.dumps(doc)) == doc
    assert _json.dumps(doc) == _json.dumpb(doc).decode("utf-8", "surrogatepass")


@pytest.mark.parametrize(
    "text",
    ['"\\ud83d"', "[NaN]", "[Infinity, -Infinity]", "1e400", '{"a": "\\udc00x"}'],
    ids=["lone-surrogate", "nan", "infinity", "beyond-double", "low-surrogate"],
)
def test_what_only_the_standard_library_accepts_is_still_accepted(text: str) -> None:
    got, want = _json.loads(text), json.loads(text)
    assert repr(got) == repr(want)  # NaN != NaN, so compare the representations


@pytest.mark.parametrize("text", ["", "{", "\ufeff{}", "[1,]", "{'a': 1}", b"\xff"])
def test_invalid_text_raises_what_the_standard_library_raises(text: str | bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as want:
        json.loads(text)
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as got:
        _json.loads(text)
    assert type(got.value) is type(want.value)


def test_output_is_compact_and_keeps_non_ascii() -> None:
    assert (
        _json.dumps({"a": [1, 2.5], "b": "你好", "c": None}) == '{"a":[1,2.5],"b":"你好","c":null}'
    )
    assert _json.dumpb({"b": "é"}) == '{"b":"é"}'.encode()


def test_what_orjson_cannot_write_is_written_by_the_standard_library() -> None:
    assert _json.dumps({1: "x"}) == '{"1":"x"}'
    assert _json.dumps([2**70]) == f"[{2**70}]"
    assert _json.dumps(["\ud83d"]) == '["\ud83d"]'
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate has no UTF-8 form
        _json.dumpb(["\ud83d"])
    with pytest.raises(TypeError):
        _json.dumps({"a": {1, 2}})
    # the one difference kept: a float that is not a number is written as JSON's null
    assert _json.dumps([math.nan, math.inf]) == "[null,null]"


def test_dataclasses_and_datetimes_are_refused_as_by_the_standard_library() -> None:
    @dataclasses.dataclass
    class Point:
        x: int

    for value in (
        Point(1),
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        datetime.date(2026, 1, 1),
    ):
        with pytest.raises(TypeError):
            json.dumps(value)
        with pytest.raises(TypeError):
            _json.dumps({"v": value})
        with pytest.raises(TypeError):
            _json.dumpb([value])


def test_uuids_are_written_where_the_standard_library_refuses_them() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert _json.dumps([value]) == '["12345678-1234-5678-1234-567812345678"]'


def test_model_chunks_must_be_utf8() -> None:
    """json.loads(bytes) would guess UTF-16; a model's stream is UTF-8 or it is refused."""
    utf16 = '{"a": 1}'.encode("utf-16")
    assert json.loads(utf16) == {"a": 1}
    with pytest.raises(UnicodeDecodeError):
        openai_compat._loads(utf16)
    assert openai_compat._loads('{"a": "é"}'.encode()) == {"a": "é"}
