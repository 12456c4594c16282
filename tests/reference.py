"""Slow, obviously-correct pure-Python versions of the alignment algorithms, written from
../shared/FUSION-METHOD.md §2–3. Tests compare the Rust core against these."""

from __future__ import annotations

import math


def levenshtein(a: str, b: str) -> int:
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def dtw_path(src: list[str], tgt: list[str]) -> list[tuple[int, int]]:
    m, n = len(src), len(tgt)
    D = [[math.inf] * (n + 1) for _ in range(m + 1)]
    D[0][0] = 0
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            D[i][j] = levenshtein(src[i - 1], tgt[j - 1]) + min(D[i - 1][j - 1], D[i - 1][j], D[i][j - 1])
    path = []
    i, j = m, n
    while True:
        path.append((i - 1, j - 1))
        if (i, j) == (1, 1):
            break
        options = [D[i - 1][j - 1], D[i - 1][j], D[i][j - 1]]  # diagonal, up, left: first minimum wins
        move = options.index(min(options))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    return path[::-1]


def map_vocab(src: list[str], tgt: list[str], usable: list[bool] | None = None) -> list[int]:
    """Identical string (first occurrence), else minimum edit distance (lowest index), among usable targets."""
    ok = [True] * len(tgt) if usable is None else list(usable)
    first = {}
    for idx, t in enumerate(tgt):
        if ok[idx]:
            first.setdefault(t, idx)
    out = []
    for s in src:
        if s in first:
            out.append(first[s])
            continue
        dists = [levenshtein(s, t) if ok[i] else math.inf for i, t in enumerate(tgt)]
        out.append(dists.index(min(dists)))
    return out


def align_topk(path, src_ids, tgt_ids, vocab_map, src_topk_ids, src_topk_logp):
    """Per target position: ({target id: prob}, carried)."""
    partners: dict[int, list[int]] = {}
    for i, j in path:
        partners.setdefault(j, []).append(i)
    out = []
    n = len(tgt_ids)
    for j in range(n):
        ps = partners.get(j, [])
        if len(ps) == 1 and vocab_map[src_ids[ps[0]]] == tgt_ids[j] and vocab_map[src_ids[ps[0]]] >= 0:
            i = ps[0]
            # Ids mapped to −1 (special / padded source ids) are dropped; the rest renormalised.
            kept = [(vocab_map[sid], math.exp(lp)) for sid, lp in zip(src_topk_ids[i], src_topk_logp[i]) if vocab_map[sid] >= 0]
            total = sum(w for _, w in kept)
            dist: dict[int, float] = {}
            for t, w in kept:
                dist[t] = dist.get(t, 0.0) + w / total
            out.append((dist, True))
        elif j + 1 < n:
            out.append(({tgt_ids[j + 1]: 1.0}, False))
        else:
            out.append(({}, False))
    return out
