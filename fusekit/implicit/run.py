"""`fusekit implicit CONFIG.yaml`: implicit model fusion (FuseChat-3.0) end to end, stage by stage.

sample → score → build → sft → (WRPO: self-sample) → dpo → eval. Each stage keeps a record
(WORKDIR/stages/NAME/stage.json) with its inputs' identity; a finished stage is skipped on re-run, an
interrupted one is redone (sampling resumes at the first missing chunk), a stage whose options changed
is redone with every stage after it. Outputs in WORKDIR: responses.parquet, sft.parquet,
pairs.parquet, sft/model, dpo/model, results.json, results.png (docs/IMPLICIT.md).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import polars as pl
from rich.console import Console

from fusekit.corpus import has_chat_template
from fusekit.implicit.build import build_sets, build_wrpo
from fusekit.implicit.config import ImplicitConfig, load_implicit
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.evaluate import evaluate_model, plot_results
from fusekit.implicit.prompts import Prompt, read_prompts
from fusekit.implicit.sample import RESPONSE_SCHEMA, sample_model
from fusekit.implicit.score import Scorer
from fusekit.implicit.vllm_backend import resolve_backend
from fusekit.models.load import load_tokenizer
from fusekit.implicit.stage import (
    STAGE_FILE,
    changed_keys,
    fingerprint,
    finish_stage,
    open_stage,
    read_stage,
    resumable,
    write_json,
    write_parquet,
)
from fusekit.implicit.tune import run_dpo, run_sft

console = Console(stderr=True)


def _source_parts(folder: Path, model: str) -> Path:
    """The part folder of one source, emptied when it holds the samples of another model."""
    marker = folder / "model.json"
    if marker.is_file() and json.loads(marker.read_text()) != {"model": model}:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(json.dumps({"model": model}) + "\n")
    return folder


def _prompts_identity(prompts: list[Prompt]) -> str:
    return fingerprint([[p.id, p.messages, p.reference] for p in prompts])


# Under torchrun rank 0 runs the stages; the other ranks wait for its word and join the training ones.
_STOP, _SFT, _DPO = 0, 1, 2


def _tell(d, command: int) -> int:
    """Rank 0's next command, on every rank (a sum in which only rank 0 counts)."""
    if not d.enabled:
        return command
    return int(d.sum([float(command) if d.is_main else 0.0], d.device(None))[0])


def _pairs_file(config: ImplicitConfig) -> Path:
    root = Path(config.workdir)
    return root / ("wrpo.parquet" if config.dpo.objective == "wrpo" else "pairs.parquet")


def _follow(config: ImplicitConfig, d) -> dict:
    """A rank other than 0: train when rank 0 trains (SFT, DPO/WRPO), on the files it has just written."""
    root = Path(config.workdir)
    while True:
        command = _tell(d, _STOP)
        if command == _STOP:
            return {"eval": [], "score": {"failed": 0}, "sft": {}, "dpo": {}, "seconds": {},
                    "models": {"sft": str(root / "sft" / "model"), "dpo": str(root / "dpo" / "model")}}
        by_id = {p.id: p for p in read_prompts(config.prompts.data)}
        if command == _SFT:
            run_sft(config.target.model, by_id, pl.read_parquet(root / "sft.parquet"), config.sft, root / "sft", False)
        elif command == _DPO:
            run_dpo(root / "sft" / "model", by_id, pl.read_parquet(_pairs_file(config)), config.dpo, root / "dpo", False)


def implicit_fusion(config: ImplicitConfig | str | Path, progress: bool = True, config_dir: Path | None = None) -> dict:
    """Run (or resume) every stage of implicit fusion; returns what it wrote to WORKDIR/results.json.

    `config` is an ImplicitConfig (paths already absolute) or the path of its YAML file. User reward
    functions are imported from the config file's folder first (`config_dir` for an object).
    Under `torchrun` rank 0 runs every stage and the other ranks join SFT and DPO/WRPO (DDP, or FSDP2
    with `fsdp: true`); they return no results. Raises ImplicitError / RecipeError with a one-line
    reason for bad input.
    """
    from fusekit.train.ddp import init_distributed

    if not isinstance(config, ImplicitConfig):
        config_dir = Path(config).resolve().parent
        config = load_implicit(config)
    d = init_distributed()
    if not d.is_main:
        return _follow(config, d)
    training: list[bool] = [False]  # set while every rank is inside SFT/DPO (an error there ends them all)
    try:
        result = _stages(config, progress, config_dir, d, training)
    except BaseException:
        if not training[0]:
            _tell(d, _STOP)
        raise
    _tell(d, _STOP)
    return result


def _stages(config: ImplicitConfig, progress: bool, config_dir: Path | None, d, training: list[bool]) -> dict:
    say = console.rule if progress else (lambda *_a, **_k: None)

    def note(message: str) -> None:
        console.print(f"[yellow]{message}[/]", highlight=False)

    # fusekit.train loads torch: imported here, so `import fusekit.implicit` stays light.
    from fusekit.train.model_card import write_stage_card
    from fusekit.train.tracking import require as require_trackers

    require_trackers([*config.sft.report_to, *config.dpo.report_to])  # a missing library fails before sampling
    root = Path(config.workdir)
    stages = root / "stages"
    root.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(config.prompts.data)
    by_id = {p.id: p for p in prompts}
    eval_prompts = read_prompts(config.eval.data) if config.eval is not None else []
    models = {s.name: s.model for s in config.sources}
    # `auto` resolved once, before any work: every stage samples with the same backend, and a backend
    # that cannot run here fails now, not after the first stages.
    backend = resolve_backend(config.sample.backend)
    sampling = config.sample.model_copy(update={"backend": backend})
    sample_opts = sampling.identity(backend)
    scorer = Scorer(config.reward, config_dir)
    timings: dict[str, float] = {}
    redo = False  # once a stage runs, every later stage runs again (its inputs were rewritten)

    # 1. sample
    say("[bold]implicit · sample")
    ident = {"prompts": _prompts_identity(prompts), "sources": models, "sample": sample_opts}
    saved = read_stage(stages / "sample")
    if saved is not None and changed_keys(ident, saved["identity"]) == ["sources"]:
        # Another set of sources: the samples of the sources that stay (same name, same model) are kept.
        note("sample: the sources changed; sampling only the new or changed ones")
        saved["identity"] = ident
        saved["done"] = False
        write_json(stages / "sample" / STAGE_FILE, saved)
    record = open_stage(stages / "sample", ident, "sample", redo)
    if record is None:
        t0, per_source, frames = time.perf_counter(), {}, []
        for s in config.sources:
            frame, stats = sample_model(s.model, s.name, prompts, sampling, _source_parts(stages / "sample" / "parts" / s.name, s.model))
            frames.append(frame)
            chat_format = "template" if has_chat_template(load_tokenizer(s.model)) else "plain"
            if chat_format == "plain":
                note(f"sample: {s.name} has no chat template; it was prompted in the plain 'role: content' format (docs/IMPLICIT.md)")
            per_source[s.name] = {**stats, "tokens_per_s": stats["tokens"] / stats["seconds"] if stats["seconds"] else None, "chat_format": chat_format, "backend": backend}
        write_parquet(pl.concat(frames), root / "responses.parquet")
        redo = True
        record = finish_stage(stages / "sample", ident, seconds=time.perf_counter() - t0, per_source=per_source)
    timings["sample"] = record["seconds"]

    # 2. score
    say("[bold]implicit · score")
    ident = {**ident, "reward": config.reward.identity()}
    record = open_stage(stages / "score", ident, "score", redo, replace=True, notify=note)
    if record is None:
        t0 = time.perf_counter()
        responses = pl.read_parquet(root / "responses.parquet").select(list(RESPONSE_SCHEMA))
        scored, report = scorer.score(responses, by_id)
        if report.failed:
            console.print(f"[yellow]score:[/] {report.failed} of {scored.height} responses got no reward (skipped); e.g. {report.examples[0]}")
        write_parquet(scored, root / "responses.parquet")
        redo = True
        record = finish_stage(stages / "score", ident, seconds=time.perf_counter() - t0, report=report.as_dict())
    timings["score"] = record["seconds"]
    score_report = record["report"]

    # 3. build
    say("[bold]implicit · build")
    ident = {**ident, "build": config.build.model_dump()}
    record = open_stage(stages / "build", ident, "build", redo, replace=True, notify=note)
    if record is None:
        t0 = time.perf_counter()
        sft, pairs = build_sets(pl.read_parquet(root / "responses.parquet"), [p.id for p in prompts], list(models), config.build.margin)
        if sft.height == 0:
            first = f"; e.g. {score_report['examples'][0]}" if score_report["examples"] else ""
            raise ImplicitError(f"no response has a reward ({score_report['failed']} failed){first}: fix the reward, then re-run")
        write_parquet(sft, root / "sft.parquet")
        write_parquet(pairs, root / "pairs.parquet")
        redo = True
        record = finish_stage(stages / "build", ident, seconds=time.perf_counter() - t0, sft=sft.height, pairs=pairs.height)
    timings["build"] = record["seconds"]

    # 4. sft, then dpo from the SFT model
    say("[bold]implicit · sft")
    ident = {**ident, "target": config.target.model, "sft": config.sft.identity()}
    resuming = not redo and resumable(stages / "sft", ident)
    record = open_stage(stages / "sft", ident, "sft", redo, replace=True, notify=note)
    if record is None:
        if not resuming:  # checkpoints of another run
            shutil.rmtree(root / "sft" / "checkpoints", ignore_errors=True)
        _tell(d, _SFT)
        training[0] = True
        info = run_sft(config.target.model, by_id, pl.read_parquet(root / "sft.parquet"), config.sft, root / "sft", progress)
        training[0] = False
        write_stage_card(root / "sft" / "model", config.target.model, "sft", list(models), config.sft.identity(), info)
        redo = True
        record = finish_stage(stages / "sft", ident, **info)
    timings["sft"], sft_info = record["seconds"], record

    pairs_path = root / "pairs.parquet"
    if config.dpo.objective == "wrpo":
        # WRPO's y_wt / y_l: the SFT model's own best and worst samples (arXiv 2412.03187).
        say("[bold]implicit · self-sample (WRPO)")
        ident = {**ident, "wrpo_self_sample": True}
        if redo or not resumable(stages / "self", ident):
            shutil.rmtree(stages / "self" / "parts", ignore_errors=True)  # samples of another SFT model
        record = open_stage(stages / "self", ident, "self-sample", redo, replace=True, notify=note)
        if record is None:
            t0 = time.perf_counter()
            own, _ = sample_model(root / "sft" / "model", f"{config.target.name}+sft", prompts, sampling, stages / "self" / "parts", stream="self")
            own, report = scorer.score(own, by_id)
            write_parquet(own, root / "self_responses.parquet")
            triples = build_wrpo(pl.read_parquet(root / "sft.parquet"), own, [p.id for p in prompts], config.build.margin)
            write_parquet(triples, root / "wrpo.parquet")
            redo = True
            record = finish_stage(stages / "self", ident, seconds=time.perf_counter() - t0, report=report.as_dict(), triples=triples.height)
        timings["self_sample"] = record["seconds"]
        pairs_path = root / "wrpo.parquet"

    say(f"[bold]implicit · {config.dpo.objective}")
    ident = {**ident, "dpo": config.dpo.identity()}
    resuming = not redo and resumable(stages / "dpo", ident)
    record = open_stage(stages / "dpo", ident, "dpo", redo, replace=True, notify=note)
    if record is None:
        if not resuming:  # another SFT model or other options: stored log-probs and checkpoints are stale
            (root / "dpo" / "reference.parquet").unlink(missing_ok=True)
            shutil.rmtree(root / "dpo" / "checkpoints", ignore_errors=True)
        _tell(d, _DPO)
        training[0] = True
        info = run_dpo(root / "sft" / "model", by_id, pl.read_parquet(pairs_path), config.dpo, root / "dpo", progress)
        training[0] = False
        write_stage_card(root / "dpo" / "model", config.target.model, config.dpo.objective, list(models), config.dpo.identity(), info)
        redo = True
        record = finish_stage(stages / "dpo", ident, **info)
    timings["dpo"], dpo_info = record["seconds"], record

    # 5. eval
    rows: list[dict] = []
    if eval_prompts:
        say("[bold]implicit · eval")
        ident = {**ident, "eval": _prompts_identity(eval_prompts)}
        if redo or not resumable(stages / "eval", ident):
            shutil.rmtree(root / "eval", ignore_errors=True)  # other models or prompts: old samples are stale
        open_stage(stages / "eval", ident, "eval", redo, replace=True)
        t0 = time.perf_counter()
        t = config.target.name
        entries = [
            (t, "target (before)", config.target.model),
            (f"{t}+sft", "target after SFT", str(root / "sft" / "model")),
            (f"{t}+sft+{config.dpo.objective}", f"target after SFT+{config.dpo.objective.upper()}", str(root / "dpo" / "model")),
            *[(s.name, "source", s.model) for s in config.sources],
        ]
        for name, role, model in entries:
            rows.append({**evaluate_model(name, model, eval_prompts, sampling, scorer, root / "eval"), "role": role})
        timings["eval"] = time.perf_counter() - t0
        finish_stage(stages / "eval", ident, rows=rows)
        plot_results(rows, root / "results.png")

    result = {
        "eval": rows,
        "score": score_report,
        "sft": {k: sft_info.get(k) for k in ("examples", "skipped", "steps", "final_loss")},
        "dpo": {k: dpo_info.get(k) for k in ("pairs", "skipped", "steps", "final_loss", "reward_accuracy")},
        "seconds": timings,
        "models": {"sft": str(root / "sft" / "model"), "dpo": str(root / "dpo" / "model")},
    }
    (root / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
