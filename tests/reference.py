"""Slow, obviously-correct pure-Python versions of the alignment algorithms, written from
../shared/FUSION-METHOD.md §2–3. Tests compare the Rust core against these."""

from __future__ import annotations

import math

import numpy as np


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


def map_vocab_vectorized(src: list[str], tgt: list[str], usable: list[bool] | None = None) -> list[int]:
    """`map_vocab` with the same brute force (every source against every usable target), but each DP row
    computed for all targets of one length at once with numpy, so that whole real vocabularies (100k+
    targets) are affordable. Row update, as in `levenshtein`: from the previous row `prev`,
    `best[j] = min(prev[j-1] + (a_i != b_j), prev[j] + 1)`, then the insertions
    `cur[j] = min(best[j], cur[j-1] + 1)`, which unrolled is `min over k ≤ j of best[k] + (j - k)`: a
    running minimum of `best[k] - k`, plus `j`."""
    ok = [True] * len(tgt) if usable is None else list(usable)
    first: dict[str, int] = {}
    groups: dict[int, list[int]] = {}
    for idx, t in enumerate(tgt):
        if ok[idx]:
            first.setdefault(t, idx)
            groups.setdefault(len(t), []).append(idx)
    # Per length n: target ids int64 [N] and code points int64 [N, n].
    tables = [(np.array(ids), np.array([[ord(c) for c in tgt[i]] for i in ids], dtype=np.int64).reshape(len(ids), n))
              for n, ids in groups.items()]
    out = []
    for s in src:
        if s in first:
            out.append(first[s])
            continue
        dist = np.full(len(tgt), np.iinfo(np.int64).max)
        for ids, codes in tables:
            n = codes.shape[1]
            offsets = np.arange(n + 1)
            prev = np.broadcast_to(offsets, (len(ids), n + 1))
            for i, ch in enumerate(s, start=1):
                best = np.empty_like(prev)
                best[:, 0] = i
                best[:, 1:] = np.minimum(prev[:, :-1] + (codes != ord(ch)), prev[:, 1:] + 1)
                prev = np.minimum.accumulate(best - offsets, axis=1) + offsets
            dist[ids] = prev[:, n]
        out.append(int(np.argmin(dist)))  # argmin: the first (lowest) index among equal minima
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
        next_maps = ps and (ps[0] + 1 >= len(src_ids) or vocab_map[src_ids[ps[0] + 1]] >= 0)
        if len(ps) == 1 and next_maps and vocab_map[src_ids[ps[0]]] == tgt_ids[j] and vocab_map[src_ids[ps[0]]] >= 0:
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


def transfer(text: bytes, src_ids, src_spans, tgt_ids, tgt_spans, src_bytes, src_ends, tgt_lookup, tgt_ends, topk_ids, topk_logp):
    """The byte-span chain-rule transfer (docs/ALIGN.md), written out as plainly as possible.

    `src_bytes[id]`: a source token's bytes (b"" for special / padded); `tgt_lookup`: bytes → the target id
    that may take mass for them; `src_ends`, `tgt_ends`: (end-of-sequence id, end-of-turn id), None where
    absent. Returns per target row ({target id: unnormalised mass}, kind) where kind
    is "fallback", "last" or "carried"; rows are not truncated.
    """

    def longest_prefix(s: bytes):
        for length in range(len(s), 0, -1):
            if s[:length] in tgt_lookup:
                return tgt_lookup[s[:length]]
        return None

    src_eos, src_eot = src_ends
    tgt_eos, tgt_eot = tgt_ends
    is_src_end = {src_eos, src_eot} - {None}

    def by_role(v):  # end of turn to end of turn, end of sequence to end of sequence, else the other
        if v == src_eot:
            return tgt_eot if tgt_eot is not None else tgt_eos
        return tgt_eos if tgt_eos is not None else tgt_eot

    def candidates(row):
        return [(int(v), math.exp(lp)) for v, lp in zip(topk_ids[row], topk_logp[row]) if v >= 0 and math.isfinite(lp)]

    out = []
    n, m = len(tgt_ids), len(src_ids)
    for j in range(n):
        if j == n - 1:
            out.append(({}, "last"))
            break
        truth = int(tgt_ids[j + 1])
        b, e = tgt_spans[j + 1]
        mass: dict[int, float] = {}

        def add(t, w):
            if t is not None and w > 0:
                mass[t] = mass.get(t, 0.0) + w

        if truth in {tgt_eos, tgt_eot} - {None} and b == e:
            text_end = max([se for ss, se in src_spans if ss < se <= b], default=0)
            us = [u for u in range(1, m) if src_ids[u] in is_src_end and text_end <= src_spans[u][0] <= b]
            if us:
                u = us[0]
                for v, p in candidates(u - 1):
                    add(truth if v in is_src_end else longest_prefix(src_bytes[v]), p)
        else:
            holding = [u for u in range(m) if src_spans[u][0] <= b < src_spans[u][1]]
            if holding and holding[0] >= 1:
                u = holding[0]
                need = text[src_spans[u][0] : b]

                def consistent(v):
                    return v == src_ids[u] or (len(src_bytes[v]) > len(need) and src_bytes[v].startswith(need))

                z = 1.0 if not need else sum(p for v, p in candidates(u - 1) if consistent(v))

                def walk(t, w, depth):
                    for v, p in candidates(t - 1):
                        if v == src_ids[t]:
                            if src_spans[t][1] >= e:
                                add(truth, w * p)
                            elif t + 1 < m and depth + 1 < 64:
                                walk(t + 1, w * p, depth + 1)
                            else:
                                add(longest_prefix(text[b : src_spans[t][1]]), w * p)
                        elif depth == 0:
                            if need and not consistent(v):
                                continue
                            if not need and v in is_src_end:
                                add(by_role(v), w * p)
                                continue
                            add(longest_prefix(src_bytes[v][len(need) :]), w * p)
                        elif src_bytes[v]:
                            add(longest_prefix(text[b : src_spans[t][0]] + src_bytes[v]), w * p)

                if z > 0:
                    walk(u, 1.0 / z, 0)
        out.append((mass, "carried" if mass else "fallback"))
    return out
