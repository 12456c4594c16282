"""Memory of FSDP2 training on CPU ranks (gloo), and of activation checkpointing: issue 24's two memory goals.

    python benchmarks/bench_fsdp_memory.py                    # both parts (a few minutes on 2 cores)
    python benchmarks/bench_fsdp_memory.py --part ranks       # 8 ranks, ~0.2B Llama: per-rank RSS by phase
    python benchmarks/bench_fsdp_memory.py --part checkpointing   # deep narrow model at 2,048 tokens

Part `ranks`: a Llama of ~0.19B parameters built from a config (random weights, fp32: M ≈ 0.76 GB),
saved once as safetensors, trained with `fusekit.run_train(..., fsdp=True).out` under
`torchrun --nproc-per-node 8` for a few short steps (memory is what is measured, not speed), with a
mid-run checkpoint and the final export. Each rank records its RSS after the imports (fusekit, FSDP2/DCP
and the model's transformers class: all the code, no weights), and its peak RSS
(VmHWM, reset at each phase) in each phase: load, training steps, checkpoint saves, export, and its RSS
every 0.25 s. Goals: every rank ≥ 1 stays within 0.10 × M of its own training steady state (the median
of its RSS while training) through load and saves, and rank 0 within 2 × M of its RSS after the imports
through training (the export is reported beside). The same run then measures the previous way, in the same processes' shape:
every rank loads the whole model (`load_model`) and shards it, and a checkpoint gathers the full model
and optimizer state (`get_*_state_dict(full_state_dict=True)`), and prints both side by side.

Part `checkpointing`: one training step (fused head, λ 0.9, AdamW) of a deep narrow Llama (32 blocks
of width 128) at 2,048 tokens, with and without `--gradient-checkpointing`, each in its own process:
step memory = peak RSS during a step above the RSS before it (warm-up step excluded), with glibc told to
map every allocation of ≥ 64 KiB on its own (`MALLOC_MMAP_THRESHOLD_`), so that freed memory leaves the RSS.
Goal: with ≤ 0.40× without, and the same step-1 loss within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

GOALS = {"rise_other_ranks": 0.10, "rank0_over_import": 2.0, "checkpointing_memory": 0.40, "loss_gap": 1e-4}
LLAMA_02B = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
DEEP_NARROW = dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=32,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


# ---------------------------------------------------------------- part "ranks": the parent

def make_model(folder: Path) -> float:
    """Save a random ~0.19B Llama in fp32 safetensors to FOLDER (in a child process, so this one stays small);
    returns M, its fp32 weight bytes."""
    code = (
        "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM; torch.manual_seed(0); "
        f"m = LlamaForCausalLM(LlamaConfig(**{LLAMA_02B!r})); m.save_pretrained(sys.argv[1]); "
        "print(sum(p.numel() * p.element_size() for p in m.parameters()))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def make_windows(path: Path, count: int, length: int, vocab: int) -> None:
    import numpy as np

    from fusekit.store.types import AlignedWindow, Candidate

    rng = np.random.default_rng(0)

    def candidate() -> Candidate:
        ids = rng.integers(0, vocab, size=(length, 4)).astype(np.int32)
        probs = rng.random((length, 4)).astype(np.float32) + 0.01
        probs /= probs.sum(1, keepdims=True)
        ce = (rng.random(length) * 4).astype(np.float32)
        return Candidate(ids=ids, probs=probs, ce=ce, mean_ce=float(ce.mean()))

    windows = [AlignedWindow(text_id=i, window=0, input_ids=rng.integers(0, vocab, size=length).astype(np.int64),
                             candidates=[candidate(), candidate(), candidate()]) for i in range(count)]
    with open(path, "wb") as f:
        pickle.dump(windows, f)


def run_ranks(args, work: Path) -> dict:
    model = work / "llama-0.2b"
    m_bytes = make_model(model)
    windows = work / "windows.pkl"
    make_windows(windows, args.ranks * args.steps, args.length, LLAMA_02B["vocab_size"])
    results = {}
    for mode in args.modes.split(","):
        out = work / f"out-{mode}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
               __file__, "--rank-worker", mode, "--model", str(model), "--windows", str(windows), "--out", str(out),
               "--steps", str(args.steps), "--length", str(args.length)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{mode} ranks failed:\n{run.stderr[-4000:]}")
        results[mode] = {"wall_s": time.perf_counter() - t0,
                         "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]}
    return {"M_bytes": m_bytes, **results}


def summarise_ranks(report: dict) -> dict:
    """Per rank, in M: the peak of load and saves above the training steady state — the median RSS while
    training (sampled every 0.25 s), and, beside it, the peak of the training steps —, and the peak through
    training above the RSS after the imports."""
    m = report["M_bytes"]
    summary = {}
    for mode in [m for m in ("fusekit", "previous") if m in report]:
        rows = []
        for r, rank in enumerate(report[mode]["ranks"]):
            peaks = rank["peaks"]
            train = max(v for k, v in peaks.items() if k.startswith("train"))
            worst = max(v for k, v in peaks.items() if k.startswith(("load", "save")))
            through_training = max(v for k, v in peaks.items() if not k.startswith("export"))
            rows.append({
                "rank": r,
                "import_rss": rank["import_rss"],
                "peaks": peaks,
                "rise_over_steady": (worst - rank["train_median_rss"]) / m,
                "rise_over_step_peak": (worst - train) / m,
                "over_import": (through_training - rank["import_rss"]) / m,
                "export_over_steady": (peaks["export"] - train) / m if "export" in peaks else None,
            })
        others = [row["rise_over_steady"] for row in rows[1:]]
        summary[mode] = {
            "rows": rows,
            "max_rise_other_ranks": max(others),
            "rank0_over_import": rows[0]["over_import"],
        }
    return summary


def print_ranks(report: dict, summary: dict) -> None:
    m = report["M_bytes"]
    gib = 2**30
    for mode, title in (("fusekit", "fusekit: meta build + rank-0 broadcast, sharded checkpoints and export"),
                        ("previous", "previous: every rank loads the whole model, checkpoints gather it")):
        rows = summary[mode]["rows"]

        def peak(row, kind):
            values = [v for k, v in row["peaks"].items() if k.startswith(kind)]
            return max(values) / gib if values else "–"

        print_table(
            f"{title} ({len(rows)} gloo ranks, M = {m / gib:.2f} GiB fp32; peak RSS per phase, GiB)",
            ["rank", "import", "load", "train", "save", "export", "rise/M", "step/M", "−import/M"],
            [[row["rank"], row["import_rss"] / gib, peak(row, "load"), peak(row, "train"), peak(row, "save"),
              peak(row, "export"), row["rise_over_steady"], row["rise_over_step_peak"], row["over_import"]]
             for row in rows],
        )
    new, old = summary["fusekit"], summary["previous"]
    print("rise/M: peak of load and saves above the median RSS while training; step/M: above the peak of the "
          "training steps; −import/M: peak through training (export excluded) above the RSS after the imports")
    print(f"ranks ≥ 1, worst rise of load/saves above their training steady state: {new['max_rise_other_ranks']:.3f} × M "
          f"(goal ≤ {GOALS['rise_other_ranks']}: {'met' if new['max_rise_other_ranks'] <= GOALS['rise_other_ranks'] else 'MISSED'}; "
          f"previous way {old['max_rise_other_ranks']:.3f} × M)")
    print(f"rank 0 through training above its RSS after the imports: {new['rank0_over_import']:.3f} × M "
          f"(goal ≤ {GOALS['rank0_over_import']}: {'met' if new['rank0_over_import'] <= GOALS['rank0_over_import'] else 'MISSED'}; "
          f"previous way {old['rank0_over_import']:.3f} × M); export peaks above the training steady state: "
          + ", ".join(f"rank {row['rank']} {row['export_over_steady']:.3f}" for row in new["rows"]) + " × M")


# ---------------------------------------------------------------- part "ranks": one rank

class Phases:
    """Peak RSS (VmHWM, reset when a phase starts) of each named phase of this process, plus RSS over time."""

    def __init__(self):
        from fusekit._procmem import memory_mb, reset_peak

        self._memory, self._reset = memory_mb, reset_peak
        self.peaks: dict[str, float] = {}
        self.timeline: list[tuple[float, str, float]] = []
        self.current: str | None = None
        self.started = time.perf_counter()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.timeline.append((time.perf_counter() - self.started, self.current or "", self._memory()["VmRSS"] * 2**20))
            time.sleep(0.25)

    def enter(self, name: str | None) -> None:
        if self.current is not None:
            key, n = self.current, 2
            while key in self.peaks:
                key, n = f"{self.current}{n}", n + 1
            self.peaks[key] = self._memory()["VmHWM"] * 2**20
        self.current = name
        if name is not None and not self._reset():
            raise SystemExit("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")

    def around(self, name: str, fn, after: str | None = None):
        def wrapped(*a, **k):
            self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.enter(after)
        return wrapped


def rank_worker(args) -> None:
    import torch

    import fusekit
    import fusekit.train.checkpoint as ckpt
    import fusekit.train.loop as loop
    import fusekit.train.sharded_state as sharded_state
    from fusekit._procmem import memory_mb
    from fusekit.train.ddp import init_distributed

    d = init_distributed()
    # "A bare import": all the code the run needs — fusekit, torch's FSDP2/DCP and the model's transformers
    # class (~240 MiB of Python modules by itself) — and no weights.
    import torch.distributed.checkpoint.hf_storage  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.model))]
    import_rss = memory_mb()["VmRSS"] * 2**20
    with open(args.windows, "rb") as f:
        windows = pickle.load(f)
    phases = Phases()
    if args.rank_worker == "fusekit":
        loop.build_sharded = phases.around("load", loop.build_sharded, after="train")
        ckpt.save_checkpoint = phases.around("save", ckpt.save_checkpoint, after="train")
        sharded_state.export_model = phases.around("export", sharded_state.export_model)
        fusekit.run_train(args.model, windows, Path(args.out) / "run", fsdp=True, lam=0.9, lr=1e-5, batch_size=1,
                      grad_accum=1, max_length=args.length, max_steps=args.steps, save_every=max(1, args.steps // 2),
                      progress=False, dtype="fp32").out
    else:
        previous_way(args, windows, d, phases)
    phases.enter(None)
    training = sorted(rss for _, phase, rss in phases.timeline if phase.startswith("train"))
    (Path(args.out) / f"rank{d.rank}.json").write_text(json.dumps(
        {"import_rss": import_rss, "peaks": phases.peaks, "train_median_rss": training[len(training) // 2],
         "timeline": phases.timeline[::4]}))
    torch.distributed.barrier()


def previous_way(args, windows, d, phases: Phases) -> None:
    """What `fusekit train --fsdp` did before: whole model on every rank, then sharded; gathered checkpoints."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from fusekit.models.load import load_model
    from fusekit.train.ddp import shard
    from fusekit.train.engine import param_groups
    from fusekit.train.head import FusionStep

    cpu = torch.device("cpu")
    phases.enter("load")
    lm = load_model(args.model)
    lm.config.use_cache = False
    step = shard(FusionStep(lm, fused=True), cpu)
    phases.enter("train")
    opt = torch.optim.AdamW(param_groups(step, 0.1), lr=1e-5, betas=(0.9, 0.95))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for s in range(args.steps):
        w = windows[s * d.world_size + d.rank]
        ids = torch.as_tensor(w.input_ids)[None]
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        t_ids = torch.as_tensor(w.candidates[0].ids)[None].long()
        t_p = torch.as_tensor(w.candidates[0].probs)[None]
        total, _, _ = step(ids, None, labels, t_ids, t_p, 0.9)
        (total / labels.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s + 1 == max(1, args.steps // 2) or s + 1 == args.steps:
            phases.enter("save")
            weights = get_model_state_dict(step, options=full)
            optim = get_optimizer_state_dict(step, opt, options=full)
            del weights, optim
            phases.enter("train")


# ---------------------------------------------------------------- part "checkpointing"

def checkpointing_child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusekit._procmem import memory_mb, reset_peak
    from fusekit.train.activation_checkpointing import enable_activation_checkpointing
    from fusekit.train.head import FusionStep

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**DEEP_NARROW)).train()
    if args.checkpointing_child == "on":
        enable_activation_checkpointing(lm)
    step = FusionStep(lm, fused=True)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    v, n = DEEP_NARROW["vocab_size"], args.tokens
    ids = torch.randint(0, v, (1, n), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    t_ids = torch.randint(0, v, (1, n, 40), generator=g)
    t_p = torch.softmax(torch.randn(1, n, 40, generator=g), -1)
    losses, peaks, times = [], [], []
    for i in range(3):
        before = memory_mb()["VmRSS"]
        reset_peak()
        t0 = time.perf_counter()
        total, _, _ = step(ids, None, labels, t_ids, t_p, 0.9)
        loss = total / labels.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        peaks.append((memory_mb()["VmHWM"] - before) * 2**20)
    # Step 1 allocates the optimizer state; steps 2-3 are the steady state.
    return {"loss": losses[0], "step_bytes": max(peaks[1:]), "step_s": min(times[1:])}


def run_checkpointing(args) -> dict:
    out = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--checkpointing-child", mode, "--tokens", str(args.tokens)]
        # Every allocation of ≥ 64 KiB gets its own mapping, returned when freed: RSS then follows live memory.
        # With glibc's default, the first step's freed activations stay in the heap, and a later step that
        # reuses them shows no growth at all (the checkpointed one: ~0 MiB), which measures nothing.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            sys.exit(f"checkpointing {mode} failed:\n{run.stderr[-3000:]}")
        out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    off, on = out["off"], out["on"]
    out["ratio"] = on["step_bytes"] / off["step_bytes"]
    out["time_ratio"] = on["step_s"] / off["step_s"]
    out["loss_gap"] = abs(on["loss"] - off["loss"])
    return out


def print_checkpointing(res: dict, tokens: int) -> None:
    c = DEEP_NARROW
    print_table(
        f"one step at {tokens} tokens, Llama {c['num_hidden_layers']} blocks × width {c['hidden_size']} "
        f"(fused head, AdamW; step memory = peak RSS in a step above the RSS before it)",
        ["--gradient-checkpointing", "step MiB", "step s", "step-1 loss"],
        [[mode, res[mode]["step_bytes"] / 2**20, res[mode]["step_s"], res[mode]["loss"]] for mode in ("off", "on")],
    )
    ok = res["ratio"] <= GOALS["checkpointing_memory"] and res["loss_gap"] <= GOALS["loss_gap"]
    print(f"checkpointing: step memory {res['ratio']:.3f} × without (goal ≤ {GOALS['checkpointing_memory']}), step-1 loss "
          f"gap {res['loss_gap']:.2e} (goal ≤ {GOALS['loss_gap']}): {'met' if ok else 'MISSED'}; step time {res['time_ratio']:.2f} ×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ranks", "checkpointing", "both"], default="both")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per rank (a checkpoint half-way and at the end)")
    parser.add_argument("--length", type=int, default=64, help="tokens per row in the ranks part")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the step in the checkpointing part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the checkpointing part")
    parser.add_argument("--modes", default="fusekit,previous", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="keep the model and outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--rank-worker", choices=["fusekit", "previous"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-child", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args)
        return
    if args.checkpointing_child:
        print(json.dumps(checkpointing_child(args)))
        return
    report: dict = {}
    if args.part in ("ranks", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            work = args.workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            ranks = run_ranks(args, work)
        summary = summarise_ranks(ranks)
        print_ranks(ranks, summary)
        report["ranks"] = {"M_bytes": ranks["M_bytes"], **summary,
                           "wall_s": {m: ranks[m]["wall_s"] for m in ("fusekit", "previous")},
                           "timelines": {m: [r["timeline"] for r in ranks[m]["ranks"]] for m in ("fusekit", "previous")}}
    if args.part in ("checkpointing", "both"):
        res = run_checkpointing(args)
        print_checkpointing(res, args.tokens)
        report["checkpointing"] = res
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
