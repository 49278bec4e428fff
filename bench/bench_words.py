"""Benchmark: sensitive-word matching of 10,000 terms over a 2,000-character message.

Run: ``.venv/bin/python bench/bench_words.py [--terms N] [--chars N] [--rounds N]``. Prints the
median and 99th-percentile time of :meth:`WordFilter.scan` for a clean message, a message with
a few (disguised) hits, and, for scale, PII masking of the same message. The target is well
under a millisecond for the scan.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imrelay.security.pii import PIIMasker, PIISettings
from imrelay.security.words import WordFilter, WordsSettings

__all__ = ["main"]

# Common characters, so terms and text share an alphabet and the automaton has real work to do.
HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
)
LATIN = "abcdefghijklmnopqrstuvwxyz"


def make_terms(count: int, rng: random.Random, *, common_first: bool) -> list[str]:
    """``count`` distinct terms: four in five Chinese phrases of 2-5 characters, the rest Latin.

    With ``common_first`` every Chinese term starts with a common character (the automaton is
    busy on prose); otherwise first characters spread over the whole CJK block (thousands of
    distinct ones, like a real list).
    """
    terms: set[str] = set()
    while len(terms) < count:
        if rng.random() < 0.8:
            tail = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 4)))
            head = rng.choice(HANZI) if common_first else chr(rng.randint(0x4E00, 0x9FA5))
            terms.add(head + tail)
        else:
            terms.add("".join(rng.choices(LATIN, k=rng.randint(5, 9))))
    return sorted(terms)


def make_message(chars: int, rng: random.Random) -> str:
    """Chinese prose with English words, digits and punctuation, ``chars`` long."""
    parts: list[str] = []
    size = 0
    while size < chars:
        kind = rng.random()
        if kind < 0.75:
            part = "".join(rng.choices(HANZI, k=rng.randint(4, 12))) + rng.choice("，。；、")
        elif kind < 0.9:
            part = " " + "".join(rng.choices(LATIN, k=rng.randint(2, 8))) + " "
        else:
            part = str(rng.randint(1, 99999))
        parts.append(part)
        size += len(part)
    return "".join(parts)[:chars]


def timed(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median and p99 of ``rounds`` calls, in microseconds."""
    fn()  # warm the fold table and caches
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def bench_list(terms: list[str], clean: str, rounds: int, rng: random.Random) -> None:
    """Build a filter over ``terms`` and time scans of ``clean`` and of it with five hits."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.txt"
        path.write_text("\n".join(terms), encoding="utf-8")
        started = time.perf_counter()
        words = WordFilter(WordsSettings(files=[path], reload_interval_s=3600))
        build_ms = (time.perf_counter() - started) * 1e3
    hits = list(clean)
    for term in rng.sample(terms, 5):  # five disguised terms spread over the message
        at = rng.randrange(0, len(hits) - 20)
        hits[at : at + len(term) * 2] = list(" ".join(term) + " ")
    dirty = "".join(hits)[: len(clean)]
    print(f"  {words.term_count} terms, automaton built in {build_ms:.0f} ms")  # noqa: T201
    for text in (clean, dirty):
        matches = len(words.scan(text))
        median, p99 = timed(lambda text=text: words.scan(text), rounds)
        print(f"  scan, {matches} matches: median {median:.0f} µs, p99 {p99:.0f} µs")  # noqa: T201


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, default=10_000)
    parser.add_argument("--chars", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=2_000)
    args = parser.parse_args(argv)
    rng = random.Random(8)
    clean = make_message(args.chars, rng)
    print(f"message: {len(clean)} characters, {args.rounds} rounds each")  # noqa: T201
    for common_first in (False, True):
        label = "common first characters" if common_first else "first characters spread out"
        print(f"list with {label}:")  # noqa: T201
        bench_list(make_terms(args.terms, rng, common_first=common_first), clean, args.rounds, rng)
    pii = PIIMasker(PIISettings())
    median, p99 = timed(lambda: pii.mask(clean), args.rounds)
    print(f"pii mask of the message (for scale): median {median:.0f} µs, p99 {p99:.0f} µs")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
