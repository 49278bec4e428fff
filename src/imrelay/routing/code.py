"""Does a text message hold code? A small hand-written classifier, no model.

What counts as code: a fenced block (```` ``` ```` or ``~~~``, whatever is inside: the sender
marked it), or at least one line that is itself source code, a SQL statement or a shell
command. What does not: prose, however technical, that mentions names in passing or in inline
``backticks``; log lines and stack traces; and structured data (JSON, YAML, CSV) outside a
fence. The labelled set in ``tests/routing/code_corpus.jsonl`` (Chinese and English) follows
these rules and the test suite enforces the accuracy on it.

Theory of operation: after the fence check, JSON spans are found by parsing (data, not code)
and every other non-blank line is labelled ``code``, ``log`` or ``prose``:

1. a line matching a log shape (timestamp, level, klog or syslog prefix, access-log line,
   stack frame, ``SomeError: …``) is ``log``;
2. string literals, comments and inline code spans are blanked out; what remains with two or
   more CJK characters is ``prose`` (so ``print("你好")`` stays code);
3. a line is ``code`` on a strong signal: a statement keyword at its start (``def``, ``class``,
   ``import``, ``const``, ``func``, ``#include``, …), a SQL statement shape, a shell command
   with arguments that look like arguments (flags, paths, pipes, a known subcommand), a
   statement ending (``;``, ``{``, ``}``), code operators (``=>``, ``==``, ``&&``, ``::``, …),
   a call ``name(…)``, an assignment, a decorator or an HTML tag;
4. a line of five or more plain words ending like a sentence, or with a run of six plain
   words, is ``prose`` (checked before the weaker signals: calls and operators);
5. an indented line right after a code line is code too (a block body).

The message is code when it has a code line and code lines are at least a third as many as
prose lines. Only the first 200 lines, 20,000 characters and 500 characters of a line are
looked at, so a long paste costs a bounded time (about a millisecond).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal

from imrelay.routing.tokens import is_cjk

__all__ = ["CodeVerdict", "detect_code", "is_code"]

LineLabel = Literal["code", "log", "prose"]

_MAX_LINES: Final = 200
_MAX_CHARS: Final = 20_000
_MAX_LINE_CHARS: Final = 500  # a longer line is judged by its start
_MAX_JSON_LINES: Final = 60  # a JSON value longer than this is not looked for

_FENCE_PAIR: Final = re.compile(r"(```|~~~).*?\1", re.DOTALL)
_FENCE_OPEN: Final = re.compile(r"^[ \t]*(```|~~~)[\w+-]*[ \t]*\n[ \t]*\S", re.MULTILINE)

_LOG: Final = tuple(
    re.compile(p)
    for p in (
        r"^\[?\d{4}[-/]\d{2}[-/]\d{2}[ T]\d{2}:\d{2}",  # 2024-05-01 12:00:01
        r"^\[?\d{2}:\d{2}:\d{2}([.,]\d+)?\]?\s",  # 10:21:03.552 [thread]
        r"^[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2} ",  # syslog: Jun 12 08:15:22 host
        r"^[EWIF]\d{4} \d{2}:\d{2}:\d{2}",  # klog: E0612 08:00:01.123456
        r"^\[?(ERROR|WARN|WARNING|INFO|DEBUG|FATAL|TRACE|CRITICAL|SEVERE|NOTICE)\]?(:|\s)",
        r"^\d{1,3}(\.\d{1,3}){3} \S+ \S+ \[",  # access log
        r"^level=\w+ ",  # logfmt
        r"^\s*at [\w$.<>/]+\(.*\)\s*$",  # Java stack frame
        r"^\s*File \"[^\"]+\", line \d+",  # Python traceback frame
        r"^Traceback \(most recent call last\)",
        r"^Exception in thread ",
        r"^([\w]+\.)*\w*(Exception|Error)(:\s|$)",  # NameError: …, java.lang.NullPointer…
    )
)

_STRING: Final = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'")
_INLINE: Final = re.compile(r"`[^`\n]+`")
_COMMENT: Final = re.compile(r"(^|\s)(#(?!include|define|!)|//|--\s).*$")

_KEYWORD_START: Final = tuple(
    re.compile(p)
    for p in (
        r"^(async\s+)?def\s+\w+\s*\(.*\)\s*(->.*)?:\s*$",
        r"^class\s+\w+(\s*\(.*\))?\s*:\s*$",
        r"^class\s+\w+(\s+(extends|implements)\s+[\w.<>, ]+)?\s*\{",
        r"^import\s+[\w.]+(\s+as\s+\w+)?(\s*,\s*[\w.]+)*\s*;?\s*$",
        r"^import\s+(\{.*\}|\*\s+as\s+\w+|\w+)\s+from\s+['\"]",
        r"^from\s+[\w.]+\s+import\s+[\w*(]",
        r"^#(include|define|ifdef|ifndef|endif|pragma)\b",
        r"^using\s+(namespace\s+)?[\w.:]+\s*;",
        r"^package\s+[\w.]+\s*;?\s*$",
        r"^(export\s+)?(default\s+)?(const|let|var)\s+[\w$\[\]{}, ]+\s*(:\s*[\w<>\[\]|]+\s*)?=",
        r"^(export\s+)?(async\s+)?function\*?\s*\w*\s*\(",
        r"^(func|fn)\s+(\(\w+ \*?\w+\)\s*)?\w*\s*[(<]",
        r"^(pub\s+)?(struct|enum|impl|trait|interface|type)\s+\w+.*[{=]\s*$",
        r"^type\s+\w+\s+(struct|interface)\s*\{",
        r"^(public|private|protected|internal)\s+[\w<>\[\], ]+[\w>\]]\s*[({=;]",
        r"^(public|private|protected|static|final|abstract)\s+[\w<>\[\], ]+\s+\w+\s*;\s*$",
        r"^(if|elif|else|for|while|with|try|except|finally)\b[^:]*:\s*$",
        r"^(if|else if|for|while|switch|catch)\s*\(.*\)\s*\{?\s*$",
        r"^(else|try|finally|do)\s*\{\s*$",
        r"^\}\s*(else|catch|finally)\b",
        r"^(val|var)\s+\w+\s*(:\s*[\w<>?]+)?\s*=",
        r"^(let\s+mut|go\s+func|defer|select\s*\{)",
        r"^@\w+(\.\w+)*(\(.*\))?\s*$",  # decorator / annotation
        r"^</?[a-z][\w-]*(\s[^<>]*)?/?>",  # markup
        r"^[.#]?[\w-]+([\s>+~]+[.#]?[\w-]+)*(:[\w-]+)?\s*\{[^{}]*:[^{}]*;?\s*\}?\s*$",  # css
        r"^\$\w+\s*=",  # php
        r"^lambda\b[^:]*:",
        r"^(return|yield|await|raise|throw)\s+[\w.]+(\(|\[|\s*[-+*/%]|;|$)",
        r"^(print|println|printf|echo|console\.log|System\.out\.\w+)\s*\(",
    )
)

_SQL_UPPER: Final = re.compile(
    r"^(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE\s+(OR\s+REPLACE\s+)?"
    r"(TABLE|INDEX|UNIQUE|VIEW|DATABASE|SCHEMA|FUNCTION|TRIGGER)|ALTER\s+TABLE|"
    r"DROP\s+(TABLE|INDEX|VIEW|DATABASE|SCHEMA)|TRUNCATE|WITH\s+\w+\s+AS\s*\(|EXPLAIN|"
    r"GRANT|REVOKE)\b"
)
_SQL_ANY: Final = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^select\s+.+\s+from\s+\w",
        r"^insert\s+into\s+[\w.]+\s*(\(|values\b)",
        r"^update\s+[\w.]+\s+set\s+\w+\s*=",
        r"^delete\s+from\s+[\w.]+(\s+where\b|\s*;|\s*$)",
        r"^create\s+(table|index)\s+[\w.]+",
        r"^alter\s+table\s+[\w.]+\s+(add|drop|rename|alter|modify)\b",
        r"^drop\s+table\s+(if\s+exists\s+)?[\w.]+\s*;?\s*$",
    )
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_COMMANDS: Final = _words(
    """
    sudo pip pip3 npm npx yarn pnpm apt apt-get yum dnf brew kubectl docker docker-compose
    helm systemctl journalctl chmod chown mkdir rm cp mv tar curl wget ssh scp rsync git
    conda nohup ps grep awk sed xargs find ls cat cd export source python python3 node
    java mvn gradle make go cargo rustc gcc g++ echo kill pkill tail head du df nc netstat
    ss ping telnet psql mysql redis-cli uvicorn gunicorn pytest terraform ansible touch ln
    unzip zip
    """
)
_SUBCOMMANDS: Final = _words(
    """
    install uninstall clone push pull commit checkout rebase merge status log run build
    apply get describe logs exec start stop restart create activate init add remove rm ps
    images compose diff fetch reset stash branch tag test update upgrade list show
    """
)
_SHELL_ARG: Final = re.compile(
    r"(^|\s)--?[A-Za-z0-9]|[/~]|\||&&|>|<|=|\*|\$\w|\b\w+\.\w{1,5}\b|:\d|\bHEAD\b"
)
_CALL: Final = re.compile(
    r"(?<![\w$.])[A-Za-z_$][\w$]*(\.[A-Za-z_$][\w$]*)*(<[^<>]*>)?\([^()]*[()]"
)
_OPERATORS: Final = re.compile(
    r"=>|->|::|!=|==|\+=|-=|\*=|&&|\|\||<<|>>|\*\*|:=|\+\+|--(?=\w)|\?\?|\?\.(?=\w)"
)
_ASSIGN: Final = re.compile(
    r"^[A-Za-z_$][\w$.]*(\[[^\]]*\])?\s*(,\s*\w+\s*)*(=|\+=|-=|:=)\s*[^=\s]"
)
_ENDING: Final = re.compile(r"(;|\{|\}|\}\)|\);|\}\);|\]\);|\):)\s*$")
_CLOSER: Final = re.compile(r"^[\]})>;,]+\s*$")
_WORD: Final = re.compile(r"[A-Za-z][a-z]*'?[a-z]*")
_SENTENCE_END: Final = re.compile(r"[.?!。？！…]\s*$")
_PLAIN_RUN: Final = re.compile(r"(?:\b[A-Za-z][a-z]+'?[a-z]*,?\s+){5}[A-Za-z][a-z]+\b")


@dataclass(frozen=True, slots=True)
class CodeVerdict:
    """Whether a text holds code, and why (for logs and ``imrelay route explain``).

    Attributes:
        is_code: the verdict.
        reason: ``fenced block``, ``N of M lines look like code`` or ``no code-like lines``.
        code_lines: lines labelled code (0 for a fenced block).
        lines: non-blank lines looked at.
    """

    is_code: bool
    reason: str
    code_lines: int = 0
    lines: int = 0


def _is_log(line: str) -> bool:
    return any(p.search(line) for p in _LOG)


def _skeleton(line: str) -> str:
    """The line with string literals, inline code spans and comments blanked out."""
    line = _INLINE.sub(" x ", line)
    line = _STRING.sub('""', line)
    return _COMMENT.sub("", line)


def _is_shell(line: str) -> bool:
    text = line.lstrip()
    if text.startswith("$ ") and len(text) > 2:
        return True
    head, _, rest = text.partition(" ")
    if head not in _COMMANDS or not rest.strip():
        return False
    first = rest.split()[0]
    return bool(_SHELL_ARG.search(rest)) or first in _SUBCOMMANDS


def _is_sql(line: str) -> bool:
    text = line.lstrip()
    return bool(_SQL_UPPER.match(text)) or any(p.match(text) for p in _SQL_ANY)


def _is_wordy(skeleton: str) -> bool:
    """A line that reads like an English sentence."""
    words = _WORD.findall(skeleton)
    if len(words) >= 5 and _SENTENCE_END.search(skeleton):
        return True
    return bool(_PLAIN_RUN.search(skeleton))


def _label(line: str, after_code: bool) -> LineLabel:
    if _is_log(line):
        return "log"
    skeleton = _skeleton(line)
    if sum(1 for ch in skeleton if is_cjk(ch)) >= 2:
        return "prose"
    body = skeleton.strip()
    if not body:  # only a string, a comment or inline code: judge the line as it was
        return "prose" if sum(1 for ch in line if is_cjk(ch)) >= 2 else "code"
    if _is_sql(body) or any(p.match(body) for p in _KEYWORD_START):
        return "code"
    if _is_shell(body) and not _SENTENCE_END.search(body):
        return "code"
    if _is_wordy(body):
        return "prose"
    if _CLOSER.match(body) or _ENDING.search(body) or body.endswith("\\"):
        return "code"
    if _OPERATORS.search(body) or _ASSIGN.match(body) or _CALL.search(body):
        return "code"
    if after_code and line[:1] in (" ", "\t"):
        return "code"
    return "prose"


def _data_lines(lines: list[str]) -> set[int]:
    """Indexes of lines inside a JSON value (a span that parses)."""
    data: set[int] = set()
    i = 0
    while i < len(lines):
        start = lines[i].strip()
        if start[:1] in ("{", "[") and i not in data:
            for j in range(i, min(len(lines), i + _MAX_JSON_LINES)):
                if lines[j].rstrip()[-1:] not in ("}", "]"):
                    continue
                try:
                    json.loads("\n".join(lines[i : j + 1]))
                except ValueError:
                    continue
                data.update(range(i, j + 1))
                i = j
                break
        i += 1
    return data


def detect_code(text: str) -> CodeVerdict:
    """Classify ``text`` (see the module docstring)."""
    text = text.replace("\r\n", "\n")[:_MAX_CHARS]
    if _FENCE_PAIR.search(text) or _FENCE_OPEN.search(text):
        return CodeVerdict(True, "fenced block")
    lines = [ln[:_MAX_LINE_CHARS] for ln in text.split("\n")[:_MAX_LINES] if ln.strip()]
    data = _data_lines(lines)
    rest = [ln for i, ln in enumerate(lines) if i not in data]
    labels: list[LineLabel] = []
    for line in rest:
        labels.append(_label(line, bool(labels) and labels[-1] == "code"))
    code = labels.count("code")
    prose = labels.count("prose")
    if code and code * 3 >= prose:
        return CodeVerdict(True, f"{code} of {len(lines)} lines look like code", code, len(lines))
    return CodeVerdict(False, "no code-like lines", code, len(lines))


def is_code(text: str) -> bool:
    """Whether ``text`` holds code (see :func:`detect_code`)."""
    return detect_code(text).is_code
