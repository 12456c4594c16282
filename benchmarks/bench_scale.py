"""Scale rehearsal: extract → align over millions of target tokens as farm jobs would run them, one shard
job's memory over a 1.5 GB Parquet corpus, and `fusekit plan` on that corpus against a 100× smaller one.

    python benchmarks/bench_scale.py [--quick] [--tokens 20e6] [--skip rehearsal,memory,plan]
                                     [--markdown docs/SCALE.md] [--keep-corpus]

1. Rehearsal: a target and 3 sources, tiny random models (1 layer, hidden 16) on real tokenizers from
   ../shared/tokenizers (Llama-2 target; GPT-2, Phi-3, MPT sources; trained ones with --quick), over a
   Parquet folder of the standard library's sources and docs repeated to ≥ --tokens target tokens.
   Extraction runs as `--shard I/N` jobs, one process per worker (the first job scans the corpus and
   saves its index; the others read only their parts); alignment (`bytespan`, 3 sources) as one job with
   --workers W. Per stage and worker count: wall time, CPU seconds, target tokens/s per core (wall) and
   per CPU second, the largest job's peak RSS. Then the wall time this implies for MiniPile (1.8B target
   tokens, 3 sources) on N machines of C cores, from the tokens per CPU second and the 2-worker
   efficiency measured here, and at efficiency 1 (for a run whose 2 workers shared their cores) (extraction with a tiny model is the preprocessing around the forward pass:
   tokenising, top-k, coding, writing; a real model's forward pass comes on top, on GPUs).
2. Memory: Parquet folders of 15 MB, 150 MB and 1.5 GB (uncompressed, 8 files, 16 MiB row groups; made
   once in $TMPDIR and reused, deleted unless --keep-corpus) and one shard job of ~4 texts over each: its
   peak RSS, cold (it scans the corpus) and warm (another job of the same store: the saved index, its own
   row groups only), and the 1.5 GB corpus's peak over the 15 MB one's (1.0: memory does not grow).
3. Plan: `fusekit plan` (plan_recipe) on that corpus and on one 100× smaller, wall times and their ratio;
   the token estimate against the exact count (the corpus repeats a base set of texts, so the exact count
   is the base's counts times the repeats).
Machine load (1-minute load average before and after each part) is printed: the CPUs may be shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import print_table  # noqa: E402

MINIPILE_TOKENS = 1.8e9
REAL = {"target": ("llama-spm", "llama"), "gpt2": ("gpt-2", "gpt2"), "phi3": ("phi-3", "llama"), "mpt": ("mpt", "gpt_neox")}
TRAINED = {"target": ("unigram", "llama"), "gpt2": ("bpe", "gpt2"), "phi3": ("unigram", "llama"), "mpt": ("wordpiece", "gpt_neox")}
CONTEXT = 512


def load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- jobs (run in child processes)

IN_PROCESS = False  # --quick: jobs run in this process, one after another (no interpreter start per job)


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _job_report(extra: dict) -> dict:
    from fusekit._procmem import memory_mb

    report = {"peak_mb": memory_mb()["VmHWM"], "cpu_s": _cpu_seconds(), **extra}
    if not IN_PROCESS:
        print("JOB " + json.dumps(report))
    return report


def _run_here(args: list[str]) -> dict:
    cpu = _cpu_seconds()
    kind, rest = args[0], args[1:]
    report = job_extract(rest[0], rest[1], rest[2], rest[3:]) if kind == "extract" else job_align(rest[0], rest[3:], rest[1], int(rest[2]))
    return {**report, "cpu_s": report["cpu_s"] - cpu}


def job_extract(model: str, data: str, out: str, shards: list[str]) -> None:
    import torch

    import fusekit

    torch.set_num_threads(1)
    for shard in shards:
        fusekit.run_extract(model, data, out, top_k=10, max_length=CONTEXT, batch_size=4, shard=shard, progress=False).out
    return _job_report({})


def job_align(target: str, sources: list[str], out: str, workers: int) -> None:
    import fusekit

    report = fusekit.run_align(target, sources, out, workers=workers, progress=False).report
    return _job_report({"report_keys": sorted(report)[:3]})


def run_job(args: list[str]) -> tuple[float, dict]:
    """Run `bench_scale.py _job …` in a child; (wall seconds, its report)."""
    started = time.perf_counter()
    if IN_PROCESS:
        report = _run_here(args)
        return time.perf_counter() - started, report
    proc = subprocess.run([sys.executable, __file__, "_job", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"job {args[:2]} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("JOB ")][-1]
    return wall, json.loads(line[4:])


def run_parallel(jobs: list[list[str]]) -> tuple[float, list[dict]]:
    """Run the jobs at once, one child each; (wall seconds, their reports). In-process: one after another."""
    started = time.perf_counter()
    if IN_PROCESS:
        reports = [_run_here(a) for a in jobs]
        return time.perf_counter() - started, reports
    procs = [subprocess.Popen([sys.executable, __file__, "_job", *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for a in jobs]
    reports = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"job failed:\n{err[-3000:]}")
        reports.append(json.loads([ln for ln in out.splitlines() if ln.startswith("JOB ")][-1][4:]))
    return time.perf_counter() - started, reports


# ---------------------------------------------------------------- inputs

def tokenizers(quick: bool) -> dict:
    from fusekit import zoo

    if quick:
        texts = zoo.stdlib_texts("prose", limit=30)
        return {name: zoo.train_tokenizer(kind, texts, vocab_size=600) for name, (kind, _) in TRAINED.items()}
    from real_tokenizers import real_tokenizer

    return {name: real_tokenizer(gguf) for name, (gguf, _) in REAL.items()}


def build_models(root: Path, toks: dict, quick: bool) -> dict[str, Path]:
    from fusekit import zoo

    arch = TRAINED if quick else REAL
    return {
        name: zoo.build_tiny_model(arch[name][1], tok, root / "models" / name, hidden=16, layers=1, heads=2, context=CONTEXT, seed=i)
        for i, (name, tok) in enumerate(toks.items())
    }


def base_texts() -> list[str]:
    from fusekit import zoo

    return [t for t in zoo.stdlib_texts("code") + zoo.stdlib_texts("prose") if t.strip()]


def write_corpus(folder: Path, texts: list[str], total_chars: float, files: int, row_group_bytes: int, compression: str = "zstd") -> int:
    """Parquet files holding `texts` repeated in order until `total_chars`; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per_file = total_chars / files
    i = rows = 0
    for f in range(files):
        writer, batch, size, written = None, [], 0, 0
        path = folder / f"part-{f:04d}.parquet"
        schema = pa.schema([("text", pa.string())])
        writer = pq.ParquetWriter(path, schema, compression=compression, use_dictionary=False)
        while written < per_file:
            t = texts[i % len(texts)]
            i += 1
            batch.append(t)
            size += len(t)
            written += len(t)
            if size >= row_group_bytes:
                writer.write_table(pa.table({"text": batch}, schema=schema), row_group_size=len(batch))
                rows += len(batch)
                batch, size = [], 0
        if batch:
            writer.write_table(pa.table({"text": batch}, schema=schema), row_group_size=len(batch))
            rows += len(batch)
        writer.close()
    return rows


def store_tokens(store: Path) -> int:
    return sum(json.loads(p.read_text()).get("tokens", 0) for p in store.glob("part-*.parquet.json"))


# ---------------------------------------------------------------- 1. rehearsal

def rehearsal(root: Path, quick: bool, target_tokens: float) -> dict:
    toks = tokenizers(quick)
    models = build_models(root, toks, quick)
    texts = base_texts()
    sample = "".join(texts[:200])
    chars_per_token = len(sample) / len(toks["target"](sample, add_special_tokens=False)["input_ids"])
    data = root / "corpus"
    rows = write_corpus(data, texts, target_tokens * chars_per_token * 1.02, files=4, row_group_bytes=4 << 20)
    print(f"corpus: {rows:,} texts, {sum(p.stat().st_size for p in data.iterdir()) / 1e6:.0f} MB Parquet, "
          f"~{target_tokens / 1e6:.2f}M target tokens ({chars_per_token:.2f} chars/token); load {load():.1f}")
    n_shards = max(4, math.ceil(target_tokens / 1e6) * 2)
    results: dict = {"extract": {}, "align": {}, "rows": rows}
    for workers in (1, 2):
        run = root / f"w{workers}"
        l0 = load()
        wall_total, cpu, peak = 0.0, 0.0, 0.0
        for name, model in models.items():
            out = run / "extract" / name
            groups = [[f"{i}/{n_shards}" for i in range(w, n_shards, workers)] for w in range(workers)]
            wall, reports = run_parallel([["extract", str(model), str(data), str(out), *g] for g in groups])
            wall_total += wall
            cpu += sum(r["cpu_s"] for r in reports)
            peak = max(peak, *(r["peak_mb"] for r in reports))
        tokens = {name: store_tokens(run / "extract" / name) for name in models}
        results["extract"][workers] = {"wall": wall_total, "cpu": cpu, "peak_mb": peak, "tokens": tokens, "load": (l0, load())}
        l0 = load()
        wall, rep = run_job(["align", str(run / "extract" / "target"), str(run / "aligned"), str(workers),
                             *[str(run / "extract" / n) for n in models if n != "target"]])
        results["align"][workers] = {"wall": wall, "cpu": rep["cpu_s"], "peak_mb": rep["peak_mb"], "tokens": tokens["target"], "load": (l0, load())}
        shutil.rmtree(run / "aligned", ignore_errors=True)
    return results


def rehearsal_tables(res: dict) -> tuple[list[list], list[list]]:
    rows = []
    for stage in ("extract", "align"):
        for w in (1, 2):
            r = res[stage][w]
            tokens = r["tokens"]["target"] if stage == "extract" else r["tokens"]
            all_tokens = sum(r["tokens"].values()) if stage == "extract" else tokens
            rows.append([
                f"{stage} ({'4 models' if stage == 'extract' else '3 sources → target'})", w, f"{tokens / 1e6:.2f}M",
                r["wall"], r["cpu"], all_tokens / r["wall"] / w, all_tokens / max(r["cpu"], 1e-9), r["peak_mb"],
                f"{r['load'][0]:.1f}→{r['load'][1]:.1f}",
            ])
    farm = []
    for stage in ("extract", "align"):
        one, two = res[stage][1], res[stage][2]
        all_tokens = sum(one["tokens"].values()) if stage == "extract" else one["tokens"]
        per_cpu_s = all_tokens / max(one["cpu"], 1e-9)  # tokens per CPU second, free of the machine's load
        efficiency = min(1.0, (one["wall"] / two["wall"]) / 2)  # 2 workers vs 1, here
        scale = MINIPILE_TOKENS / res["extract"][1]["tokens"]["target"]  # MiniPile target tokens / ours
        for machines, cores in ((1, 16), (1, 64), (8, 64), (32, 64), (128, 64)):
            seconds = all_tokens * scale / (per_cpu_s * machines * cores)  # every core as busy as one worker here
            farm.append([stage, machines, cores, f"{efficiency:.2f}", _hours(seconds / efficiency), _hours(seconds)])
    return rows, farm


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


# ---------------------------------------------------------------- 2. memory, 3. plan

def big_corpus(quick: bool, keep_dir: Path, fraction: float = 1.0) -> tuple[Path, int, list[str]]:
    """The Parquet folder of `fraction` × 1.5 GB (1 MB with --quick), made once in `keep_dir`: 8 uncompressed
    files, 16 MiB row groups; (its data folder, its number of texts, the base texts it repeats)."""
    texts = base_texts()
    size = (1e6 if quick else 1.5e9) * fraction
    suffix = "" if fraction == 1.0 else f"-{fraction:g}"
    folder = keep_dir / (("fusekit-scale-corpus-quick" if quick else "fusekit-scale-corpus") + suffix)
    done = folder / "DONE"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        rows = write_corpus(folder / "data", texts, size, files=8, row_group_bytes=16 << 20, compression="none")
        done.write_text(str(rows))
        print(f"wrote {folder} ({rows:,} texts) in {time.perf_counter() - started:.0f} s")
    rows = int(done.read_text())
    return folder / "data", rows, texts


MEMORY_FRACTIONS = (0.01, 0.1, 1.0)  # corpora of 15 MB, 150 MB and 1.5 GB: one shard job's memory must not follow
TEXTS_PER_SHARD = 4


def memory(root: Path, quick: bool, keep_dir: Path) -> dict:
    """One shard job of ~4 texts over each corpus size, cold (it scans the corpus) and warm (the saved index):
    peak RSS per size, and the largest corpus's peak over the smallest's (1.0 = memory does not grow)."""
    toks = tokenizers(True)  # the model's size is not what is measured: a tiny trained tokenizer
    model = build_models(root / "mem", {"target": toks["target"]}, True)["target"]
    results = {}
    for fraction in MEMORY_FRACTIONS:
        data, rows, _ = big_corpus(quick, keep_dir, fraction)
        num = max(1, min(rows // TEXTS_PER_SHARD, 99_999))
        out = root / f"mem-store-{fraction:g}"
        size = {"bytes": sum(p.stat().st_size for p in data.iterdir()), "rows": rows, "num_shards": num}
        for label, shard in (("cold", min(7, num - 1)), ("warm", num - 1)):
            l0 = load()
            wall, rep = run_job(["extract", str(model), str(data), str(out), f"{shard}/{num}"])
            size[label] = {"wall": wall, "peak_mb": rep["peak_mb"], "load": (l0, load())}
        results[fraction] = size
        shutil.rmtree(out, ignore_errors=True)
    return results


def memory_tables(res: dict) -> tuple[list[list], str]:
    rows = []
    for fraction, size in res.items():
        for label in ("cold", "warm"):
            v = size[label]
            how = "cold (scans the corpus)" if label == "cold" else "warm (saved index)"
            rows.append([how, f"{size['bytes'] / 1e9:.3f} GB", f"{size['rows']:,}", f"1/{size['num_shards']:,}", v["wall"], v["peak_mb"],
                         f"{v['load'][0]:.1f}→{v['load'][1]:.1f}"])
    small, big = res[min(res)], res[max(res)]
    ratios = ", ".join(f"{label} {big[label]['peak_mb'] / small[label]['peak_mb']:.3f}×" for label in ("cold", "warm"))
    title = (f"One extraction shard job (~{TEXTS_PER_SHARD} texts) over Parquet folders {big['bytes'] / small['bytes']:.0f}× apart in size: "
             f"peak RSS largest / smallest = {ratios}")
    return rows, title


def plan_ratio(root: Path, quick: bool, keep_dir: Path) -> dict:
    import yaml

    from fusekit.corpus import read_records
    from fusekit.plan import plan_recipe
    from fusekit.recipe import load_recipe

    data, rows, texts = big_corpus(quick, keep_dir)
    big_bytes = sum(p.stat().st_size for p in data.iterdir())
    small = root / "small-corpus"
    write_corpus(small, texts, big_bytes / 100, files=1, row_group_bytes=16 << 20, compression="none")
    toks = tokenizers(True)
    if quick:  # a target and one source: the same code paths, half the extractions
        toks = {k: toks[k] for k in ("target", "gpt2")}
    models = build_models(root / "plan", toks, True)
    import fusekit

    # Imports and the first model load are paid once per process: not by whichever corpus is planned first.
    (root / "warm.txt").write_text("warm up\n")
    fusekit.run_extract(models["target"], root / "warm.txt", root / "warm", top_k=2, max_length=16, progress=False).out
    fusekit.run_align(root / "warm", root / "warm", root / "warm-aligned", progress=False).report
    out = {}
    exact_bytes = 100_000 if quick else None  # quick: the 1 MB corpus is sampled, as the 1.5 GB one is
    for label, corpus in (("1/100", small), ("full", data)):
        recipe = {
            "workdir": str(root / "plan-work"), "target": {"name": "target", "model": str(models["target"])},
            "sources": [{"name": n, "model": str(models[n])} for n in models if n != "target"],
            "corpus": {"name": "c", "data": str(corpus)}, "extract": {"top_k": 5, "max_length": 128, "batch_size": 8},
            "train": {"variants": [{"name": "m", "fusion": "min_ce", "lam": 0.5}], "lr": 1e-3, "batch_size": 4, "max_length": 128, "max_steps": 1},
        }
        path = root / f"recipe-{label.replace('/', '_')}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        l0 = load()
        started = time.perf_counter()
        plan = plan_recipe(load_recipe(path), exact_bytes=exact_bytes)
        wall = time.perf_counter() - started
        out[label] = {"wall": wall, "plan": plan, "load": (l0, load())}
    # Exact count of the full corpus: its texts are the base texts in order, repeated.
    tok = toks["target"]
    per_text = [len(tok(t, add_special_tokens=False)["input_ids"]) + (1 if tok.eos_token_id is not None else 0) for t in texts]
    full_cycles, rest = divmod(rows, len(texts))
    exact = full_cycles * sum(per_text) + sum(per_text[:rest])
    n_read = sum(1 for _ in read_records(data)) if quick else rows  # quick: the reader agrees with the row count
    assert n_read == rows
    out["exact_target_tokens"] = exact
    return out


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: trained tokenizers, 8k tokens, a 1 MB corpus, in one process")
    parser.add_argument("--tokens", type=float, default=20e6, help="target tokens of the rehearsal (default 20M)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: rehearsal, memory, plan")
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown here")
    parser.add_argument("--keep-corpus", action="store_true", help="keep the generated 1.5 GB corpus in $TMPDIR for a later run")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    tokens = 8_000 if args.quick else args.tokens
    global IN_PROCESS
    IN_PROCESS = args.quick
    md: list[str] = [f"Machine: {os.cpu_count()} cores; load average at start {load():.1f}.\n"]
    keep_dir = Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="fusekit-scale-") as tmp:
        root = Path(tmp)
        if "rehearsal" not in skip:
            res = rehearsal(root / "r", args.quick or not (ROOT.parent / "shared" / "tokenizers").is_dir(), tokens)
            rows, farm = rehearsal_tables(res)
            cols = ["stage", "workers", "target tokens", "wall s", "CPU s", "tokens/s/core (wall)", "tokens/CPU s", "peak RSS MiB", "load"]
            print_table("rehearsal: extract → align", cols, rows)
            fcols = ["stage", "machines", "cores each", "2-worker efficiency", "MiniPile wall time", "at efficiency 1"]
            print_table("MiniPile (1.8B target tokens, 3 sources) implied", fcols, farm)
            md += [_md("Rehearsal: extract → align", cols, rows), _md("MiniPile (1.8B target tokens, 3 sources), implied", fcols, farm)]
        if "memory" not in skip:
            rows, title = memory_tables(memory(root, args.quick, keep_dir))
            cols = ["shard job", "corpus", "texts", "shard", "wall s", "peak RSS MiB", "load"]
            print_table(title, cols, rows)
            md.append(_md(title, cols, rows))
        if "plan" not in skip:
            res = plan_ratio(root, args.quick, keep_dir)
            exact = res["exact_target_tokens"]
            rows = []
            for label in ("1/100", "full"):
                p = res[label]["plan"]
                est = p["models"]["target"]["tokens"]
                rows.append([label, p["corpus"]["estimate"]["how"], res[label]["wall"], f"{est:,}",
                             f"{(est - exact) / exact:+.2%}" if label == "full" else "", f"{res[label]['load'][0]:.1f}→{res[label]['load'][1]:.1f}"])
            ratio = res["full"]["wall"] / res["1/100"]["wall"]
            cols = ["corpus", "how", "wall s", "target tokens", "vs exact", "load"]
            print_table(f"fusekit plan: full / (1/100) time = {ratio:.2f}× (exact target tokens {exact:,})", cols, rows)
            md.append(_md(f"`fusekit plan`: full / (1/100) wall time = {ratio:.2f}× (exact target tokens {exact:,})", cols, rows))
    if not args.keep_corpus:
        for folder in keep_dir.glob("fusekit-scale-corpus*"):
            shutil.rmtree(folder, ignore_errors=True)
    if args.markdown:
        args.markdown.write_text("\n".join(md) + "\n")


def _md(title: str, cols: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_job":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "extract":
            job_extract(rest[0], rest[1], rest[2], rest[3:])
        else:
            job_align(rest[0], rest[3:], rest[1], int(rest[2]))
    else:
        main()
