"""Small texts of the kinds that stress cross-tokenizer transfer, from what every install has.

prose (the Python reference topics in `pydoc_data`), code (standard-library source), multilingual text
with CJK, emoji and combining marks, numbers, and whitespace-heavy tables (tabs, runs of spaces, CRLF).
Deterministic: the same texts on every machine with the same Python.
"""

from __future__ import annotations

import random

MULTILINGUAL = [
    "東京は日本の首都です。人口は約1400万人で、世界最大の都市圏の一つです。🗼🍣",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。今天天气很好！😀👍🏽",
    "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐릅니다. 🇰🇷 안녕하세요!",
    "Ünïcödé nörmälïzätïön: café vs cafe\u0301, naïve, Å vs A\u030a, ﬁ ligature, ½ and ² — “quotes” «guillemets».",
    "Emoji sequences: 👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏿 thumbs, ❤️ heart, 🤖 robot, 🧪🔬 science.",
    "Mixed: Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी — and English in between.",
]


def _prose() -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return [topics[k][:1500] for k in keys[::12][:8]]


def _code() -> list[str]:
    import inspect
    import json
    import textwrap

    out = []
    for obj in (json.dumps, textwrap.wrap, textwrap.TextWrapper._wrap_chunks, inspect.cleandoc, random.Random.shuffle):
        out.append(inspect.getsource(obj)[:1500])
    return out


def _numbers(rng: random.Random) -> list[str]:
    out = []
    for _ in range(6):
        parts = []
        for _ in range(40):
            kind = rng.randrange(5)
            if kind == 0:
                parts.append(str(rng.randrange(10 ** rng.randrange(1, 9))))
            elif kind == 1:
                parts.append(f"{rng.uniform(-1000, 1000):.{rng.randrange(1, 5)}f}")
            elif kind == 2:
                parts.append(f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}")
            elif kind == 3:
                parts.append(f"{rng.randrange(1, 10**6):,}")
            else:
                parts.append(f"{rng.randrange(100)}%")
        out.append(" ".join(parts))
    return out


def _tables(rng: random.Random) -> list[str]:
    out = []
    for t in range(5):
        rows = []
        for _ in range(12):
            cells = [f"{rng.choice(['alpha', 'beta', 'gamma', 'x', 'total'])}", f"{rng.randrange(10**5)}", f"{rng.random():.3f}"]
            if t % 2:
                rows.append("\t".join(cells))
            else:
                rows.append(f"| {cells[0]:<8} | {cells[1]:>8} | {cells[2]:>6} |")
        sep = "\r\n" if t == 1 else "\n"
        indent = " " * (4 * (t % 3))
        out.append(sep.join(indent + r for r in rows) + sep)
    return out


def probe_texts(seed: int = 0) -> dict[str, list[str]]:
    """Text kind → texts: prose, code, multilingual (CJK/emoji/combining), numbers, tables (whitespace)."""
    rng = random.Random(seed)
    return {
        "prose": _prose(),
        "code": _code(),
        "multilingual": list(MULTILINGUAL),
        "numbers": _numbers(rng),
        "tables": _tables(rng),
    }
