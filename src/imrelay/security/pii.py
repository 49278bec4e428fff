"""PII masking: find personal data in a text and replace it before a model or a log sees it.

Theory of operation: each entity type has a candidate regex and a validator. A candidate must not
touch a longer run of digits or letters (so digits inside an order number never match), and the
validator checks what a regex cannot:

- mobile: an allocated 13x-19x prefix (not 154, 194, 140-144, …), optional +86/0086/86;
- id_card: GB 11643-1999 region code, birth date and MOD 11-2 check character;
- bank_card: 15 (34/37 only) or 16-19 digits starting 3-6 (9: 19 digits only), Luhn; an
  18-digit number with an identity number's region and birth date is a mistyped ID, not a card;
- landline: area code 010, 02x or 0[3-9]xx, local number of 8 digits (7 or 8 after a four-digit
  code) not starting with 0 or 1, optional extension; 400/95xxx service numbers never match;
- ipv4: octets ≤ 255 without leading zeros; ipv6: ``ipaddress``, and at least one digit
  (``a::b`` is C++);
- email: a dotted domain with a letter TLD, not followed by ``:path`` (``git@host:repo``).

Addresses that identify nobody are left alone: unspecified (``0.0.0.0``, ``::``), loopback
(``127.0.0.1``, ``::1``) and netmasks (``255.255.255.0``). IPv4 and version strings: a dotted
quad is an address unless a version word comes right before it (``version``, ``ver``,
``build``, ``release``, ``firmware``, ``版本``, ``版本号``, ``固件``, ``升级到``/``升级至``,
``upgrade to``/``update to``, optionally followed by ``:``, ``：``, ``=``, ``号``, ``为`` or
``是``). ``v1.2.3.4`` is never an address (a letter touches it).

Candidates are resolved leftmost-longest (ties: the order of :data:`BUILTIN_TYPES`, then custom
patterns). Then the text is scanned again with every entity found replaced by neutral characters
of the same length, until nothing new appears: an entity hidden only because it touched another
one (``10.0.0.1-13800138000``) is found too, so a masked text holds nothing detectable.

Full-width digits (``１３８…``) are read as digits. Masking is irreversible (``[PHONE]``) unless a
vault is given: then each distinct value gets a numbered placeholder (``<PHONE_1>``) recorded in
the vault, a plain ``dict`` placeholder → value that the caller keeps per conversation and user,
and :func:`restore` puts the values back into the model's reply.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BUILTIN_TYPES",
    "LABELS",
    "CustomPattern",
    "Entity",
    "MaskResult",
    "PIIMasker",
    "PIISettings",
    "Vault",
    "luhn_valid",
    "restore",
    "valid_id_card",
]

Vault = dict[str, str]
"""Placeholder (``<PHONE_1>``) → original value, for one conversation and user."""

BUILTIN_TYPES: Final = ("email", "id_card", "bank_card", "mobile", "landline", "ipv6", "ipv4")
LABELS: Final[Mapping[str, str]] = {
    "mobile": "PHONE",
    "id_card": "ID",
    "bank_card": "CARD",
    "email": "EMAIL",
    "ipv4": "IP",
    "ipv6": "IP",
    "landline": "TEL",
}

_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*_\d+)>")
_NEUTRAL = "\ue000"  # a private-use character no pattern matches: stands in for a found entity


class CustomPattern(BaseModel):
    """An extra entity type: ``name`` (lowercase, also the placeholder label) and its regex."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    regex: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be lowercase letters, digits and _, starting with a letter")
        if value in LABELS:
            raise ValueError(f"{value!r} is a built-in type")
        return value

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        if compiled.search(""):
            raise ValueError("the pattern must not match an empty string")
        return value


class PIISettings(BaseModel):
    """``security.pii``: which entity types are masked, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    mobile: bool = True
    id_card: bool = True
    bank_card: bool = True
    email: bool = True
    ipv4: bool = True
    ipv6: bool = True
    landline: bool = True
    custom: list[CustomPattern] = Field(default_factory=list)
    reversible: bool = False


@dataclass(frozen=True, slots=True)
class Entity:
    """One piece of personal data; ``start``/``end`` index the text it was found in."""

    type: str
    start: int
    end: int
    value: str


@dataclass(frozen=True, slots=True)
class MaskResult:
    """The masked text and the entities that were replaced, in text order."""

    text: str
    entities: tuple[Entity, ...]


# -- validators -------------------------------------------------------------------------------

_FULL_WIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")
_ID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK: Final = "10X98765432"
# GB/T 2260 province-level codes (71 Taiwan, 81 Hong Kong, 82 Macao, 83 Taiwan residence permit)
_ID_REGIONS: Final = frozenset((
    "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
    "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
    "65", "71", "81", "82", "83",
))  # fmt: skip
_MOBILE_PREFIXES: Final = frozenset(
    [f"13{d}" for d in range(10)]
    + ["145", "146", "147", "148", "149"]
    + [f"15{d}" for d in range(10) if d != 4]
    + ["162", "165", "166", "167"]
    + [f"17{d}" for d in range(9)]
    + [f"18{d}" for d in range(10)]
    + [f"19{d}" for d in range(10) if d != 4]
)
_CARD_FIRST: Final = frozenset("34569")


def _digits(text: str) -> str:
    """The ASCII digits of ``text`` (full-width digits converted), everything else dropped."""
    return "".join(ch for ch in text.translate(_FULL_WIDTH_DIGITS) if "0" <= ch <= "9")


def _id_shaped(number: str) -> bool:
    """Region code and birth date of an identity number, whatever the check character."""
    if len(number) != 18 or not number[:17].isdigit() or number[:2] not in _ID_REGIONS:
        return False
    try:
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return 1900 <= born.year <= 2099


def valid_id_card(number: str) -> bool:
    """Whether ``number`` is a valid 18-character resident identity number (GB 11643-1999).

    Checks the region code, the birth date and the ISO 7064 MOD 11-2 check character.
    """
    number = number.translate(_FULL_WIDTH_DIGITS).upper()
    if not _id_shaped(number):
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17]


def luhn_valid(digits: str) -> bool:
    """Whether the digit string ``digits`` passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid_mobile(value: str) -> bool:
    digits = _digits(value)
    if len(digits) == 13:
        if not digits.startswith("86"):
            return False
        digits = digits[2:]
    elif len(digits) == 15:
        if not digits.startswith("0086"):
            return False
        digits = digits[4:]
    return len(digits) == 11 and digits[:3] in _MOBILE_PREFIXES


def _valid_card(value: str) -> bool:
    digits = _digits(value)
    if len(digits) == 15:
        return digits[:2] in ("34", "37") and luhn_valid(digits)
    if not 16 <= len(digits) <= 19 or digits[0] not in _CARD_FIRST:
        return False
    if digits[0] == "9" and len(digits) != 19:  # domestic 9-cards (9558…) have 19 digits
        return False
    # An 18-digit number with an identity number's region and birth date is a mistyped ID.
    return not _id_shaped(digits) and luhn_valid(digits)


def _valid_landline(match: re.Match[str]) -> bool:
    area = match.group("pa") or match.group("sa")
    local = _digits(match.group("local"))
    if area is None:  # area code and number written as one run: 010/02x take three digits
        run = _digits(match.group("ca")) + local
        cut = 3 if run[1] in "12" else 4
        area, local = run[:cut], run[cut:]
    area = _digits(area)
    if area[1] == "1":
        area_ok = area == "010"
    elif area[1] == "2":
        area_ok = len(area) == 3
    else:
        area_ok = len(area) == 4
    lengths = (8,) if len(area) == 3 else (7, 8)
    return area_ok and len(local) in lengths and local[0] not in "01"


_VERSION_BEFORE = re.compile(
    r"(?<![A-Za-z])(?:version|ver\.?|build|release|firmware|upgrade\s+to|update\s+to|版本号?|固件|升级[到至])"
    r"\s*[:：=号为是]?\s*$",
    re.IGNORECASE,
)


def _valid_ipv4(match: re.Match[str], text: str) -> bool:
    parts = match.group(0).split(".")
    if any(len(p) > 1 and p[0] == "0" for p in parts) or any(int(p) > 255 for p in parts):
        return False
    address = ipaddress.IPv4Address(match.group(0))
    if address.is_unspecified or address.is_loopback or _is_netmask(int(address)):
        return False
    start = match.start()
    return _VERSION_BEFORE.search(text[max(0, start - 24) : start]) is None


def _is_netmask(value: int) -> bool:
    """255.255.255.0 and its kind: ones, then zeros (also 255.255.255.255)."""
    inverted = ~value & 0xFFFFFFFF
    return value >> 24 == 0xFF and inverted & (inverted + 1) == 0


def _ipv6_text(value: str) -> str:
    """``value`` without a colon that ends the sentence rather than the address."""
    return value[:-1] if value.endswith(":") and not value.endswith("::") else value


def _valid_ipv6(value: str) -> bool:
    # An address without any digit (``a::b``, ``dead::beef``) is far more likely C++ or a joke.
    if not any(ch.isdigit() for ch in value):
        return False
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_loopback)


# -- candidate patterns -----------------------------------------------------------------------

_D = "[0-9０-９]"
_NOT_BEFORE = rf"(?<![0-9０-９A-Za-z_])(?<!{_D}[.\-])"
_AREA = rf"[0０]{_D}{{2,3}}"
_NOT_AFTER = rf"(?![0-9０-９A-Za-z_])(?![.\-]{_D})"

_PATTERNS: Final[Mapping[str, re.Pattern[str]]] = {
    "email": re.compile(
        r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@"
        r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
        r"(?!:[A-Za-z0-9/~])"  # git@github.com:org/repo is an SSH target, not a mailbox
    ),
    "id_card": re.compile(
        rf"{_NOT_BEFORE}{_D}{{6}} ?{_D}{{8}} ?{_D}{{3}}[0-9０-９Xx]{_NOT_AFTER}"
    ),
    "bank_card": re.compile(
        rf"{_NOT_BEFORE}(?:{_D}{{15,19}}"
        rf"|{_D}{{4}}(?P<s>[ \-]){_D}{{4}}(?P=s){_D}{{4}}(?P=s)"
        rf"(?:{_D}{{4}}(?:(?P=s){_D}{{1,3}})?|{_D}{{3}}))"
        rf"{_NOT_AFTER}"
    ),
    "mobile": re.compile(
        rf"(?<![0-9０-９A-Za-z_+＋])(?<!{_D}[.\-])"
        rf"(?:(?:[+＋]|00)?{_D}{{2}}[ \-]?)?"
        rf"{_D}{{3}}(?:{_D}{{8}}|[ \-]{_D}{{4}}[ \-]{_D}{{4}}|{_D}{{4}}[ \-]{_D}{{4}})"
        rf"{_NOT_AFTER}"
    ),
    "landline": re.compile(
        rf"{_NOT_BEFORE}"
        rf"(?:[(（](?P<pa>{_AREA})[)）] ?|(?P<sa>{_AREA})[ \-]|(?P<ca>{_AREA}))"
        rf"(?P<local>{_D}{{7,8}}|{_D}{{3,4}}[ \-]{_D}{{4}})(?:[\-转]{_D}{{1,5}})?{_NOT_AFTER}"
    ),
    "ipv6": re.compile(
        r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
        r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
        r"(?![0-9A-Za-z_:]|\.\d)",
        re.ASCII,
    ),
    "ipv4": re.compile(
        r"(?<![0-9A-Za-z_.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9A-Za-z_])(?!\.\d)", re.ASCII
    ),
}

_Validator = Callable[[re.Match[str], str], bool]
_VALIDATORS: Final[Mapping[str, _Validator]] = {
    "email": lambda m, text: True,  # the pattern says it all (also used for custom patterns)
    "id_card": lambda m, text: valid_id_card(m.group(0).replace(" ", "")),
    "bank_card": lambda m, text: _valid_card(m.group(0)),
    "mobile": lambda m, text: _valid_mobile(m.group(0)),
    "landline": lambda m, text: _valid_landline(m),
    "ipv6": lambda m, text: _valid_ipv6(_ipv6_text(m.group(0))),
    "ipv4": _valid_ipv4,
}


def _custom_label(name: str) -> str:
    return name.upper()


class PIIMasker:
    """Finds and masks the entity types enabled in ``settings``."""

    def __init__(self, settings: PIISettings) -> None:
        self.settings = settings
        self._finders: list[tuple[str, re.Pattern[str], _Validator]] = [
            (name, _PATTERNS[name], _VALIDATORS[name])
            for name in BUILTIN_TYPES
            if settings.enabled and getattr(settings, name)
        ]
        if settings.enabled:
            self._finders.extend(
                (c.name, re.compile(c.regex), _VALIDATORS["email"]) for c in settings.custom
            )
        self._labels = dict(LABELS) | {c.name: _custom_label(c.name) for c in settings.custom}

    @property
    def active(self) -> bool:
        """Whether any entity type is enabled."""
        return bool(self._finders)

    def label(self, entity_type: str) -> str:
        """The placeholder label of ``entity_type`` (``mobile`` → ``PHONE``)."""
        return self._labels[entity_type]

    def _candidates(self, text: str) -> Iterator[tuple[int, int, int, str]]:
        """``(start, -end, rank, type)`` of every valid candidate: sorting puts leftmost first,
        then longest, then the type listed first."""
        for rank, (name, pattern, valid) in enumerate(self._finders):
            for m in pattern.finditer(text):
                value = m.group(0)
                if not value or _NEUTRAL in value or not valid(m, text):
                    continue
                if name == "ipv6":
                    value = _ipv6_text(value)
                yield m.start(), -(m.start() + len(value)), rank, name

    def find(self, text: str) -> list[Entity]:
        """Every entity in ``text``, in text order, without overlaps (see the module docstring)."""
        found: list[Entity] = []
        scan = text
        while True:
            added: list[Entity] = []
            reach = 0  # candidates come leftmost first: one overlaps iff it starts before this
            for start, neg_end, _, name in sorted(self._candidates(scan)):
                if start >= reach:
                    added.append(Entity(name, start, -neg_end, text[start:-neg_end]))
                    reach = -neg_end
            if not added:
                return sorted(found, key=lambda e: e.start)
            found.extend(added)
            pieces: list[str] = []
            pos = 0
            for e in added:
                pieces += (scan[pos : e.start], _NEUTRAL * (e.end - e.start))
                pos = e.end
            pieces.append(scan[pos:])
            scan = "".join(pieces)

    def mask(self, text: str, *, vault: Vault | None = None) -> MaskResult:
        """Replace every entity in ``text``.

        Args:
            text: the text to mask.
            vault: the conversation's vault for reversible masking; updated in place with new
                placeholders. ``None`` masks irreversibly (``[PHONE]``).
        """
        entities = self.find(text)
        if not entities:
            return MaskResult(text, ())
        reverse = {} if vault is None else _reverse(vault)
        out: list[str] = []
        pos = 0
        for e in entities:
            out.append(text[pos : e.start])
            label = self._labels[e.type]
            if vault is None:
                out.append(f"[{label}]")
            else:
                out.append(_placeholder(vault, reverse, label, e.value))
            pos = e.end
        out.append(text[pos:])
        return MaskResult("".join(out), tuple(entities))


def _canonical(value: str) -> str:
    return re.sub(r"[\s\-()（）]", "", value.translate(_FULL_WIDTH_DIGITS)).casefold()


def _reverse(vault: Vault) -> dict[tuple[str, str], str]:
    reverse: dict[tuple[str, str], str] = {}
    for placeholder, value in vault.items():
        label = placeholder[1:].rsplit("_", 1)[0]
        reverse[(label, _canonical(value))] = placeholder
    return reverse


def _placeholder(vault: Vault, reverse: dict[tuple[str, str], str], label: str, value: str) -> str:
    key = (label, _canonical(value))
    existing = reverse.get(key)
    if existing is not None:
        return existing
    prefix = f"<{label}_"
    # exact <LABEL_N> only: a custom type's label may extend a built-in one (ID_EMP vs ID)
    used = [
        int(number)
        for p in vault
        if p.startswith(prefix) and p.endswith(">") and (number := p[len(prefix) : -1]).isdigit()
    ]
    placeholder = f"{prefix}{max(used, default=0) + 1}>"
    vault[placeholder] = value
    reverse[key] = placeholder
    return placeholder


def restore(text: str, vault: Mapping[str, str]) -> str:
    """Put the values of ``vault`` back in place of their placeholders in ``text``.

    Placeholders not in the vault are left as they are.
    """
    if not vault or "<" not in text:
        return text
    return _PLACEHOLDER.sub(lambda m: vault.get(m.group(0), m.group(0)), text)
