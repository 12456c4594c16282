"""The model card every trained folder holds: a README.md with the Hugging Face hub's YAML metadata.

It says how the model was made — base model, sources and how each was aligned, corpus, fusion rule,
λ and preset, the training figures — and, once `fusekit run` has evaluated it, the eval tables (and
the hub's `model-index`), so the folder can be pushed to the hub as it is.

The card is YAML front matter plus sections between `<!-- fusekit:NAME -->` markers; `update_card`
replaces or adds sections and metadata keys, leaving the rest (and a user's own text outside the
markers) as it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

CARD = "README.md"
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def looks_like_hub_id(ref: str) -> bool:
    """A hub id (`org/name` or `name`) that is not a local path: the hub's `base_model` takes only those."""
    p = Path(ref).expanduser()
    return not p.exists() and not ref.startswith((".", "/", "~")) and ref.count("/") <= 1 and p.suffix != ".gguf"


def read_card(folder: str | Path) -> tuple[dict, str]:
    """(metadata, body) of FOLDER/README.md; ({}, "") when there is none."""
    path = Path(folder) / CARD
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    found = _FRONT.match(text)
    if not found:
        return {}, text
    return yaml.safe_load(found.group(1)) or {}, text[found.end() :]


def _section(name: str, text: str) -> str:
    return f"<!-- fusekit:{name} -->\n{text.strip()}\n<!-- /fusekit:{name} -->\n"


def render(metadata: dict, title: str, sections: dict[str, str]) -> str:
    front = yaml.safe_dump({k: v for k, v in metadata.items() if v not in (None, [], {})}, sort_keys=False, allow_unicode=True)
    body = f"# {title}\n\n" + "\n".join(_section(n, t) for n, t in sections.items() if t)
    return f"---\n{front}---\n\n{body}"


def write_card(folder: str | Path, metadata: dict, title: str, sections: dict[str, str]) -> Path:
    path = Path(folder) / CARD
    path.write_text(render(metadata, title, sections), encoding="utf-8")
    return path


def update_card(folder: str | Path, metadata: dict | None = None, sections: dict[str, str] | None = None) -> Path:
    """Set metadata keys and sections (replacing a section of the same name, else adding it at the end)."""
    meta, body = read_card(folder)
    meta.update(metadata or {})
    for name, text in (sections or {}).items():
        block = _section(name, text)
        pattern = re.compile(rf"<!-- fusekit:{re.escape(name)} -->\n.*?<!-- /fusekit:{re.escape(name)} -->\n", re.S)
        body = pattern.sub(lambda _: block, body) if pattern.search(body) else body.rstrip("\n") + "\n\n" + block
    front = yaml.safe_dump({k: v for k, v in meta.items() if v not in (None, [], {})}, sort_keys=False, allow_unicode=True)
    path = Path(folder) / CARD
    path.write_text(f"---\n{front}---\n{body if body.startswith(chr(10)) else chr(10) + body}", encoding="utf-8")
    return path


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def _aligned_facts(aligned: Any) -> tuple[list[dict], dict]:
    """(sources, corpus) from an aligned store folder's manifest and report; empty for in-memory windows."""
    if not isinstance(aligned, (str, Path)):
        return [], {}
    folder = Path(aligned)
    try:
        settings = json.loads((folder / "manifest.json").read_text())["settings"]
    except (OSError, KeyError, ValueError):
        return [], {}
    report = {}
    if (folder / "report.json").is_file():
        report = {s.get("index"): s for s in json.loads((folder / "report.json").read_text()).get("sources", [])}
    methods = settings.get("methods") or []
    sources = []
    for i, src in enumerate(settings.get("sources", [])):
        stats = report.get(i + 1, {})
        sources.append(
            {
                "model": src.get("model"),
                "method": methods[i] if i < len(methods) else None,
                "k": src.get("k"),
                "carried_share": stats.get("carried_share"),
            }
        )
    corpus = {"texts": settings.get("n_texts"), "fingerprint": settings.get("corpus_fingerprint"), "aligned_store": str(folder.resolve())}
    return sources, corpus


def _training_figures(out: Path, last: dict, steps: int, world_size: int) -> str:
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()] if (out / "metrics.jsonl").is_file() else []
    run = last.get("run", {})
    rows = [
        ("optimizer steps", steps),
        ("processes", world_size),
        ("tokens trained on", f"{sum(r.get('tokens', 0) for r in log):,}" if log else None),
        ("loss, first → last step", f"{_fmt(log[0]['loss'])} → {_fmt(log[-1]['loss'])}" if log else _fmt(last.get("loss"))),
        ("CLM loss, last step", _fmt(last.get("clm"))),
        ("fusion loss, last step", _fmt(last.get("fusion"))),
        ("throughput (last invocation), tokens/s", f"{run['tokens_per_s']:,.0f}" if run.get("tokens_per_s") else None),
        ("peak memory (last invocation), MiB", f"{run['peak_memory_mib']:,.0f} ({run.get('peak_memory_kind')})" if run.get("peak_memory_mib") else None),
        ("wall time, s", _fmt(log[-1].get("elapsed_s")) if log else None),
    ]
    return "## Training\n\n" + _table(["", "value"], [r for r in rows if r[1] not in (None, "—")]) + "\n\nEvery step's figures: `metrics.jsonl`."


# The fusion term of each `--loss`, as the card says it (train/divergence.py has the definitions).
LOSS_TEXT = {
    "ce": "cross-entropy to the fused distribution (FuseLLM)",
    "kl": "forward KL(teacher‖student) on the teacher's top-k plus one rest bucket",
    "reverse_kl": "reverse KL(student‖teacher) on the teacher's top-k plus one rest bucket (MiniLLM)",
    "jsd": "generalized JSD (GKD), β = {beta}",
    "uld": "sorted-probability L1, Universal Logit Distillation (Boizard et al. 2024)",
    "gold": "GOLD's hybrid: JSD (β = {beta}) on the ids the transfer maps, ULD on the rest (TRL)",
}


def loss_text(cfg) -> str:
    return f"`{cfg.loss}`: " + LOSS_TEXT.get(cfg.loss, cfg.loss).format(beta=cfg.loss_beta)


def _objective(cfg) -> str:
    if not cfg.uses_target:
        return "CLM only (λ = 1: the continual-training baseline, no source distributions)"
    schedule = f" ({cfg.lam_schedule} → {cfg.lam_end if cfg.lam_schedule == 'linear' else 1.0})" if cfg.lam_schedule != "constant" else ""
    return f"λ·CLM + (1−λ)·fusion, λ = {cfg.lam}{schedule}"


def _fusion_rule(cfg) -> str:
    if cfg.fusion == "min_ce":
        return "the candidate with the lowest cross-entropy (MinCE)"
    if cfg.fusion == "avg_ce":
        return "the CE-weighted average of the candidates (AvgCE)"
    return f"the `{cfg.fusion}` fusion"


def _method_table(cfg, extra: Sequence[tuple[str, Any]] = ()) -> str:
    method = cfg.model_dump(mode="json")
    rows = [(k, f"`{v}`") for k, v in method.items() if k not in ("save_every", "keep_checkpoints", "stop_after", "log_every", "report_to")]
    return "## Method\n\n" + _table(["option", "value"], [*rows, *((k, f"`{v}`") for k, v in extra)])


def _use(out: Path) -> str:
    return (
        "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{out.name}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{out.name}\")\n```"
    )


def _card_metadata(base_model: str, tags: list[str]) -> dict:
    return {
        "base_model": base_model if looks_like_hub_id(base_model) else None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }


def write_fusion_card(out: str | Path, base_model: str, aligned: Any, cfg, steps: int, last: dict, world_size: int = 1) -> Path:
    """The card of a `fusekit train` output (called once the model is exported).

    `cfg` is the run's TrainConfig; `aligned` the aligned store folder (or windows, then the sources are
    not known); `last` the final step's metrics with the run figures.
    """
    out = Path(out)
    sources, corpus = _aligned_facts(aligned)
    fused = cfg.uses_target
    tags = ["fusekit", "knowledge-fusion", cfg.preset] + ([cfg.fusion.replace("_", "-")] if fused else ["clm-baseline"])
    about = (
        f"`{out.name}` is `{base_model}` trained by fusekit with {cfg.preset}'s recipe "
        f"({'FuseLLM' if cfg.preset == 'fusellm' else 'FuseChat'}): {_objective(cfg)}."
        + (f" The fusion target at each {cfg.granularity} is {_fusion_rule(cfg)} over the target and the sources below." if fused else "")
    )
    source_text = ""
    if sources:
        source_text = "## Sources\n\n" + _table(
            ["source", "alignment onto the target's tokens", "top-k", "target positions carried"],
            [(s["model"], s["method"], s["k"], f"{s['carried_share']:.1%}" if isinstance(s["carried_share"], float) else None) for s in sources],
        ) + "\n\nAlignment methods: `bytespan` (chain-rule transfer on byte spans), `fusellm` (the paper's 1:1 carry), `fusechat` (FuseChat's statistical vocabulary map)."
    corpus_text = ""
    if corpus:
        corpus_text = "## Corpus\n\n" + _table(["", "value"], [("texts", corpus["texts"]), ("fingerprint", f"`{corpus['fingerprint']}`"), ("aligned store", f"`{corpus['aligned_store']}`")])
    return write_card(
        out, _card_metadata(base_model, tags), out.name,
        {"about": about, "sources": source_text, "corpus": corpus_text, "method": _method_table(cfg),
         "training": _training_figures(out, last, steps, world_size), "use": _use(out)},
    )


def write_distill_card(out: str | Path, base_model: str, teachers: Sequence[dict], cfg, steps: int, last: dict,
                       world_size: int = 1, *, top_k: int, transfer: str, policy: dict, corpus: dict) -> Path:
    """The card of a `fusekit distill` output (teachers run online; called once the model is exported).

    `teachers`: per teacher {"model" (path or hub id as given), "tokenizer_family", "vocab_size",
    "weights" (fingerprint prefix)}, in candidate order; `policy`: {"on_policy_ratio", "prompt_share",
    "sample_temperature"}; `corpus`: {"records", "fingerprint"}; `cfg` the run's TrainConfig.
    """
    out = Path(out)
    fused = cfg.uses_target
    ratio = float(policy.get("on_policy_ratio", 0.0))
    regime = "on-policy" if ratio >= 1.0 else "mixed" if ratio > 0 else "off-policy"
    tags = ["fusekit", "knowledge-distillation", "online-distillation", regime] + ([cfg.fusion.replace("_", "-")] if fused else ["clm-baseline"])
    if ratio > 0:
        policy_text = (
            f"{ratio:.0%} of the micro-batches (GKD's mixing weight) train on the target's own samples — a text window's "
            f"first {policy.get('prompt_share', 0.5):.0%} as the prompt, a chat's conversation before its last answer — drawn at "
            f"temperature {policy.get('sample_temperature', 1.0)} and scored by the teachers; the rest on the corpus"
        )
    else:
        policy_text = "off-policy: every micro-batch is the corpus's (as FuseLLM), scored by the teachers as it is read"
    about = (
        f"`{out.name}` is `{base_model}` distilled by fusekit from {len(teachers)} teacher{'s' if len(teachers) != 1 else ''} run online beside it "
        f"(no extraction store): {_objective(cfg)}"
        + (f", fusion term {loss_text(cfg)}. The fusion target at each {cfg.granularity} is {_fusion_rule(cfg)} over the "
           f"target and the teachers below, each teacher's top-{top_k} carried onto the target's tokens by the `{transfer}` transfer."
           if fused else ".")
        + f" Policy: {policy_text}."
    )
    teacher_text = "## Teachers\n\n" + _table(
        ["teacher", "tokenizer family", "vocabulary (logits)", "top-k", "transfer onto the target's tokens", "weights fingerprint"],
        [(f"`{t['model']}`", t.get("tokenizer_family"), t.get("vocab_size"), top_k, transfer, f"`{t['weights']}`" if t.get("weights") else None)
         for t in teachers],
    )
    corpus_text = "## Corpus\n\n" + _table(["", "value"], [("records", corpus.get("records")), ("fingerprint", f"`{corpus.get('fingerprint')}`")])
    extra = [("teachers", ", ".join(str(t["model"]) for t in teachers)), ("top_k", top_k), ("transfer", transfer),
             ("on_policy_ratio", ratio)]
    if ratio > 0:
        extra += [("prompt_share", policy.get("prompt_share")), ("sample_temperature", policy.get("sample_temperature"))]
    return write_card(
        out, _card_metadata(base_model, tags), out.name,
        {"about": about, "sources": teacher_text, "corpus": corpus_text, "method": _method_table(cfg, extra),
         "training": _training_figures(out, last, steps, world_size), "use": _use(out)},
    )


def write_stage_card(folder: str | Path, base_model: str, stage: str, sources: Sequence[str], options: dict, figures: dict) -> Path:
    """The card of an implicit-fusion stage's model (FuseChat-3.0: SFT, then DPO/WRPO on the SFT model)."""
    folder = Path(folder)
    metadata = {
        "base_model": base_model if looks_like_hub_id(base_model) else None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fusekit", "implicit-fusion", "fusechat-3.0", stage],
    }
    about = (
        f"`{base_model}` after the {stage.upper()} stage of implicit fusion (FuseChat-3.0) by fusekit: every source "
        "answered every prompt, a reward scored the answers, and the target was fine-tuned on the best answers (SFT)"
        + ("." if stage == "sft" else f", then on best-vs-worst pairs of one source ({stage.upper()}, the SFT model as reference).")
    )
    return write_card(
        folder, metadata, f"{Path(base_model).name} + {stage if stage == 'sft' else 'sft + ' + stage}",
        {
            "about": about,
            "sources": "## Sources\n\n" + "\n".join(f"- `{s}`" for s in sources),
            "method": "## Method\n\n" + _table(["option", "value"], [(k, f"`{v}`") for k, v in options.items()]),
            "training": "## Training\n\n" + _table(["", "value"], [(k, _fmt(v)) for k, v in figures.items() if v is not None]),
        },
    )


def add_evaluation(folder: str | Path, name: str, tables_markdown: str, results: Sequence[dict]) -> Path:
    """Add the eval tables and the hub's `model-index` (this model's figures) to a card.

    `results`: {"dataset", "metric", "value", "name"} per figure of this model (`type` of the hub's
    task is text-generation).
    """
    index = [
        {
            "name": name,
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": r["dataset"], "type": r["dataset"]},
                    "metrics": [{"type": r["metric"], "value": float(r["value"]), "name": r.get("name", r["metric"])}],
                }
                for r in results
            ],
        }
    ]
    return update_card(folder, {"model-index": index}, {"evaluation": "## Evaluation\n\n" + tables_markdown.strip()})
