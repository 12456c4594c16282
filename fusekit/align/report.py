"""Alignment quality per source: what `fusekit align` writes to report.json and prints as a table.

Counts (`candidates.SourceStats`, added up while the candidates are made) come from the shards'
sidecars (deterministic, summed over every complete shard, whichever job wrote it); speeds come from
this run only.

* carried: share of predicted target positions (all but each window's last) that took the source's
  top-k through a 1:1 alignment; fallback = the rest (one-hot on the next target token).
* top-k mass: mean, over carried positions, of the source's full-softmax probability held by its top-k.
* mass kept: the same restricted to top-k entries whose id maps to an *identical* target token, i.e.
  the probability that survives the vocabulary map exactly (MinED-mapped entries land on a different
  token string).
* vocab map exact / MinED: shares of the source vocabulary mapped to an identical target string / by
  minimum edit distance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from fusekit.align.candidates import SourceStats

if TYPE_CHECKING:  # pragma: no cover
    from fusekit.align.shard import ShardResult
    from fusekit.align.vocab_cache import VocabMap


def _share(num: float, den: float) -> float | None:
    return num / den if den else None


def build_report(
    settings: dict,
    sidecars: dict[str, dict],
    vmaps: Sequence["VocabMap"],
    results: Sequence["ShardResult"],
    *,
    wall: float,
    workers: int,
    ray: str | None,
    target_ref: str,
    source_refs: Sequence[str],
) -> dict:
    n_sources = len(settings["sources"])
    totals = [SourceStats() for _ in range(n_sources)]
    windows = tokens = 0
    for info in sidecars.values():
        windows += int(info.get("rows", 0))
        tokens += int(info.get("tokens", 0))
        for s, part in zip(totals, info.get("sources", [])):
            s.add(part)
    run_tokens = sum(int(r.info["tokens"]) for r in results)
    sources = []
    for i, (s, vm) in enumerate(zip(totals, vmaps)):
        seconds = sum(r.source_seconds[i] for r in results if len(r.source_seconds) > i)
        sources.append(
            {
                "index": i + 1,
                "store": source_refs[i] if i < len(source_refs) else None,
                "model": settings["sources"][i].get("model"),
                "scheme": settings["sources"][i].get("scheme"),
                **s.as_json(),
                "method": (settings.get("methods") or ["fusellm"] * n_sources)[i],
                "carried_share": _share(s.carried, s.positions),
                "perfect_source_recall": _share(s.recalled, s.positions),
                "bad_mass_share": _share(s.bad_mass, s.carried),
                "fallback_share": _share(s.positions - s.carried, s.positions),
                "topk_mass_mean": _share(s.topk_mass, s.carried),
                "kept_mass_mean": _share(s.kept_mass, s.carried),
                "vocab_map": vm.as_json(),
                "tokens_per_s": run_tokens / seconds if results and seconds > 0 else None,
            }
        )
    return {
        "format": "fusekit-align-report",
        "target": {
            "store": target_ref,
            "model": settings["target"].get("model"),
            "scheme": settings["target"].get("scheme"),
            "windows": windows,
            "tokens": tokens,
        },
        "shards": {"complete": len(sidecars), "total": int(settings["num_shards"])},
        "sources": sources,
        "run": {
            "shards": sorted(r.index for r in results),
            "tokens": run_tokens,
            "seconds": wall,
            "tokens_per_s": run_tokens / wall if results and wall > 0 else None,
            "workers": workers,
            "ray": ray,
        },
    }


TIMINGS = "timings.json"  # beside report.json: this run's speeds, which differ between identical runs


def split_timings(report: dict) -> tuple[dict, dict]:
    """(the report without speeds — byte-identical for identical stores, whichever run wrote them —, the
    speeds: the run section and each source's tokens/s)."""
    stable = {k: v for k, v in report.items() if k != "run"}
    stable["sources"] = [{k: v for k, v in s.items() if k != "tokens_per_s"} for s in report["sources"]]
    timings = {"run": report["run"], "sources": [{"index": s["index"], "tokens_per_s": s["tokens_per_s"]} for s in report["sources"]]}
    return stable, timings


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _compact(x: float | None) -> str:
    if x is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def print_report(report: dict, console=None) -> None:
    """The report as a rich table, one row per source."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    t = report["target"]
    shards = report["shards"]
    table = Table(
        title=f"alignment onto {t['model'] or t['store']}: {t['tokens']:,} target tokens in {t['windows']:,} windows "
        f"({shards['complete']}/{shards['total']} shards)"
    )
    for col in ("source", "method", "carried", "recall", "top-k", "bad", "exact", "empty", "tok/s"):
        if col == "source":
            table.add_column(col, min_width=12, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for s in report["sources"]:
        vm = s["vocab_map"]
        speed = s.get("tokens_per_s")
        table.add_row(
            f"{s['index']}: {s['model'] or s['store']}",
            s.get("method", "fusellm"),
            _pct(s["carried_share"]),
            _pct(s.get("perfect_source_recall")),
            _pct(s["topk_mass_mean"]),
            _pct(s.get("bad_mass_share")),
            _pct(vm["exact_share"]),
            str(s["empty_windows"]),
            _compact(speed),
        )
    console.print(table)
    console.print(
        "carried = target positions that took the source's distribution (the rest: one-hot on the next target token); "
        "recall = positions where a perfect source would put ≥ ½ on the target's true next token; top-k = the "
        "source's probability in its carried top-k; bad = mass on byte-fallback twins, special or empty target ids "
        "(must be 0); exact = source vocabulary with an identical target string; empty = windows with no carried "
        "position; tok/s = target tokens per second of this source's transfer",
        style="dim",
    )
    run = report["run"]
    if run["tokens_per_s"] is not None:
        console.print(
            f"this run: {len(run['shards'])} shard(s), {run['tokens']:,} target tokens in {run['seconds']:.1f} s "
            f"({run['tokens_per_s']:,.0f} tokens/s on {run['workers']} worker thread(s){', Ray' if run['ray'] else ''})"
        )
    else:
        console.print("this run: nothing to do (every shard was already complete)")
