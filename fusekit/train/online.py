"""Online distillation: the teachers run beside the target during training, with no extraction store.

`distill(target, teachers, corpus, out, …)` trains the target on λ·CLM + (1−λ)·fusion exactly as
`fusekit train` does over an aligned store; only where the aligned windows come from differs. Here an
`OnlineWindows` source makes them on demand: for the texts of the windows a micro-batch needs, each
model (the teachers and a frozen copy of the target, whose own distribution is candidate [0] as in
FuseLLM) runs over the text with its own tokenizer (`extract.shard.model_windows`, the extraction's
code), and the byte-span transfer carries each teacher's top-k and per-token CE onto the target's tokens
(`align.shard.align_texts`, the alignment's code). The trainer's data plan, fusion rule (MinCE/AvgCE per
window or token, `examples.window_example`), packing and fused output layer are the offline ones, so
the offline and online paths give the same loss on the same batch up to what the extraction store's
codec quantises (top-k log-probs on a 1/8-nat grid: docs/EXTRACT.md; tests/train/test_online.py).

Differences from the offline path, on purpose:
* Teachers run in eval mode under `inference_mode`, in bf16 on CUDA and fp32 on CPU; their top-k is
  used unquantised (no store).
* The decode group of the data plan is a chunk of `texts_per_group` texts: a group's texts are run
  together (batched forwards) the first time one of its windows is needed, and kept until every window
  of it has been trained on (within a shuffle buffer of `BUFFER_GROUPS` groups).
* The whole corpus is tokenised by the target once at the start (window lengths fix the plan).

A run's identity (`run_identity`: teachers' paths and weight/tokenizer fingerprints, corpus fingerprint,
top-k, transfer, policy) joins the training options in every checkpoint, so `--resume` refuses a changed
run by `fusekit train`'s own check; the model card (`model_card.write_distill_card`) names the teachers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fusekit.corpus import Record, corpus_fingerprint, read_records
from fusekit.store.types import AlignedWindow, Window
from fusekit.train.examples import TrainDataError

TEXTS_PER_GROUP = 8
_TRAIN_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments of the trained target


class TeacherMemoryError(RuntimeError):
    """Teachers that do not fit beside the trained target, with the figures and the way out."""


@dataclass
class OnlineModel:
    """One model run online (a teacher, or the frozen target): the network in eval mode and what
    extraction would have recorded about it."""

    ref: str
    net: Any
    tokenizer: Any
    vocab_size: int
    window: int  # tokens per window: min(max_length, the model's context), as `fusekit extract` cuts
    info: Any  # VocabInfo
    param_bytes: int


def param_bytes_of(model_ref: str, dtype_bytes: int, trust_remote_code: bool = False) -> int:
    """Bytes of the model's parameters in a dtype of `dtype_bytes` bytes, counted on the meta device
    (nothing is allocated). Tied embeddings count once."""
    from fusekit.models.load import parameter_count

    return parameter_count(model_ref, trust_remote_code) * dtype_bytes


def free_memory(device) -> int:
    """Bytes free on `device`: CUDA's free memory, else the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_memory(target: str, teachers: Sequence[str], device, dtype_bytes: int, available: int | None = None,
                 say: Callable[[str], None] | None = None, shards: int = 1) -> dict:
    """Each teacher's parameter bytes (stated through `say`), and a refusal before anything is loaded when
    the teachers, the frozen target copy and the trained target's state do not fit in `available` bytes
    (default: what is free on `device`). `shards`: ranks the trained target's state is split over (FSDP2);
    every rank holds whole teachers and a whole frozen copy. Returns the figures."""
    sizes = {ref: param_bytes_of(ref, dtype_bytes) for ref in teachers}
    target_params = param_bytes_of(target, 1)
    frozen = target_params * dtype_bytes
    training = target_params * _TRAIN_BYTES_PER_PARAM // max(1, shards)
    need = sum(sizes.values()) + frozen + training
    free = free_memory(device) if available is None else int(available)
    if say is not None:
        for ref, b in sizes.items():
            say(f"teacher {ref}: {b / 2**20:.1f} MiB of parameters ({dtype_bytes}-byte weights, eval mode, no gradients)")
        per = f" (its 1/{shards} shard under FSDP2)" if shards > 1 else ""
        say(f"frozen target copy (candidate 0): {frozen / 2**20:.1f} MiB; trained target with AdamW: ~{training / 2**20:.1f} MiB{per}")
    if need > free:
        worst = max(sizes, key=sizes.get) if sizes else target
        raise TeacherMemoryError(
            f"the teachers need {sum(sizes.values()) / 2**20:.1f} MiB of parameters ({worst}: {sizes.get(worst, 0) / 2**20:.1f} MiB), "
            f"and with the frozen target copy and the trained target's state ~{need / 2**20:.1f} MiB in all, but "
            f"{device} has {free / 2**20:.1f} MiB free: distil offline instead — `fusekit extract` each teacher "
            "and the target, `fusekit align`, then `fusekit train` (one model in memory at a time) — or use fewer teachers"
        )
    return {"teacher_param_bytes": sizes, "frozen_target_bytes": frozen, "training_bytes": training, "free_bytes": free}


def load_online_model(ref: str, dtype: str, device, max_length: int) -> OnlineModel:
    """A model run online: loaded in `dtype` on `device`, eval mode, gradients off."""
    from fusekit.models.device import load_net
    from fusekit.models.identity import logit_size, model_context
    from fusekit.models.load import load_config, load_tokenizer, require_fast_tokenizer
    from fusekit.vocab.info import vocab_info

    tokenizer = require_fast_tokenizer(load_tokenizer(ref), ref)
    config = load_config(ref, False)
    vocab_size = logit_size(config)
    context = model_context(config)
    net = load_net(ref, dtype, device, False)
    for p in net.parameters():
        p.requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    return OnlineModel(ref, net, tokenizer, vocab_size, min(max_length, context) if context else max_length,
                       vocab_info(tokenizer, vocab_size), size)


class OnlineWindows:
    """The trainer's window source (`DataPlan`'s interface: `lengths`, `groups`, `read`, …) whose aligned
    windows are computed when read: the models run over the texts of the wanted windows and the teachers'
    top-k is transferred onto the target's tokens.

    `records`: the corpus; `target`: the frozen target (its tokens fix the windows; its top-k is candidate
    [0]); `teachers` in candidate order. `windows_hook(model_index, windows)`, for tests and experiments:
    called on each model's extracted windows before alignment (0 = the target, then the teachers), may
    return replacements (e.g. the values an extraction store would hold after its codec).
    """

    random_access = True
    folder = None  # no loader processes: the models live in this process

    def __init__(
        self,
        records: Sequence[Record],
        target: OnlineModel,
        teachers: Sequence[OnlineModel],
        *,
        top_k: int,
        append_eos: bool = True,
        batch_size: int = 8,
        pack: bool = True,
        texts_per_group: int = TEXTS_PER_GROUP,
        windows_hook: Callable[[int, list[Window]], list[Window]] | None = None,
    ):
        from fusekit.align.shard import SourceSide
        from fusekit.align.transfer import Method, Transferer
        from fusekit.extract.shard import tokenize_text

        if not records:
            raise TrainDataError("the corpus holds no texts: nothing to train on")
        if not teachers:
            raise TrainDataError("give at least one teacher (--teacher)")
        self.records, self.target, self.teachers = list(records), target, list(teachers)
        self.top_k, self.append_eos, self.batch_size, self.pack = top_k, append_eos, batch_size, pack
        self.windows_hook = windows_hook
        for m in [target, *teachers]:
            if top_k > m.vocab_size:
                raise TrainDataError(f"--top-k {top_k} exceeds the vocabulary of {m.ref} ({m.vocab_size})")
        lengths, text_of, first = [], [], []
        for text_id, record in enumerate(self.records):
            _, tok = tokenize_text(target.tokenizer, record, text_id, target.vocab_size, append_eos)
            first.append(len(lengths))
            n = len(tok.input_ids)
            for s in range(0, n, target.window):
                lengths.append(min(n, s + target.window) - s)
                text_of.append(text_id)
        if not lengths:
            raise TrainDataError("the corpus's texts hold no tokens for the target: nothing to train on")
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._text_of = np.asarray(text_of, dtype=np.int64)
        self._first = np.asarray(first, dtype=np.int64)
        # Groups of whole texts: window bounds at every `texts_per_group`-th text that has windows.
        starts = sorted({int(self._first[t]) for t in range(0, len(self.records), max(1, texts_per_group))} | {0})
        self._bounds = np.asarray([s for s in starts if s < len(lengths)] + [len(lengths)], dtype=np.int64)
        self._sides = [
            SourceSide(top_k, t.info, Method.BYTESPAN, transferer=Transferer(t.info, target.info, Method.BYTESPAN))
            for t in self.teachers
        ]
        self.texts_run = 0  # texts the models ran over so far (for the record)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def text_of(self, window: int) -> int:
        """The corpus record (its index in `records`) that window `window` (global index) comes from."""
        return int(self._text_of[window])

    def groups(self) -> np.ndarray:
        return self._bounds

    def get(self, index: int) -> AlignedWindow:
        return self.read(index, index + 1, [index])[0]

    def read(self, start: int, stop: int, wanted: Sequence[int], candidates: bool = True) -> list[AlignedWindow]:
        """Windows `wanted` (global indices), aligned; without `candidates` only their tokens (λ = 1)."""
        from fusekit.extract.shard import tokenize_text

        texts = sorted({int(self._text_of[w]) for w in wanted})
        if not candidates:
            out = {}
            for t in texts:
                _, tok = tokenize_text(self.target.tokenizer, self.records[t], t, self.target.vocab_size, self.append_eos)
                for w, s in enumerate(range(0, len(tok.input_ids), self.target.window)):
                    ids = tok.input_ids[s : s + self.target.window]
                    mask = None if tok.mask is None else tok.mask[s : s + self.target.window]
                    out[int(self._first[t]) + w] = AlignedWindow(t, w, ids, [], mask)
            return [out[int(w)] for w in wanted]
        aligned = self.align_records([(t, self.records[t]) for t in texts])
        index = {int(self._first[w.text_id]) + int(w.window): w for w in aligned}
        return [index[int(w)] for w in wanted]

    def align_records(self, records: Sequence[tuple[int, Record]]) -> list[AlignedWindow]:
        """Every target window of `records` ((text id, record) pairs, ids ascending) with its candidates:
        each model run over each text with its own tokenizer, the teachers' top-k transferred whole-text."""
        from fusekit.align.shard import align_texts
        from fusekit.extract.shard import model_windows, tokenize_text

        per_model: list[dict[int, list[Window]]] = []
        for i, m in enumerate([self.target, *self.teachers]):
            toks = [tokenize_text(m.tokenizer, r, t, m.vocab_size, self.append_eos) for t, r in records]
            windows = model_windows(m.net, toks, self.top_k, m.vocab_size, m.window, self.batch_size, self.pack)
            if self.windows_hook is not None:
                windows = self.windows_hook(i, windows)
            by_text: dict[int, list[Window]] = {}
            for w in windows:
                by_text.setdefault(int(w.text_id), []).append(w)
            per_model.append(by_text)
        texts = [t for t, _ in records]
        aligned, _, _, _ = align_texts(texts, per_model[0], per_model[1:], self.top_k, self._sides, self.target.info, recall=False)
        self.texts_run += len(texts)
        return aligned


def read_corpus(data: str | Path | Sequence[str], field: str = "text") -> list[Record]:
    """The corpus's records: a path `fusekit extract` reads (text, JSONL, Parquet, folder) or texts in memory."""
    if isinstance(data, (str, Path)):
        return list(read_records(data, field))
    return [Record(text=t) for t in data]


@dataclass(frozen=True)
class ModelFacts:
    """What a teacher is, for the resume identity and the model card: read from its config, weight files and
    tokenizer (`models.identity`, the fingerprints `fusekit train` checks the target by); nothing is loaded
    onto a device."""

    ref: str  # as given
    where: str  # the absolute path of a local model, else the hub id
    weights: str  # model_fingerprint: sha256 of the config and the weight files' heads and tails
    tokenizer: str  # tokenizer_fingerprint: sha256 of the fast tokenizer's JSON
    tokenizer_family: str  # the tokenizer's model type and marker scheme, e.g. "BPE (byte-level)"
    vocab_size: int  # logits of the model
    tokenizer_object: Any = None  # the loaded tokenizer (for the chat-template check); not part of the identity

    def identity(self) -> str:
        """One line a resumed run must match: where the model is and what its weights and tokenizer are
        (64-bit prefixes of the fingerprints: enough to tell an accidental change)."""
        return f"{self.where} (weights {self.weights[:16]}, tokenizer {self.tokenizer[:16]})"


def model_facts(ref: str) -> ModelFacts:
    """`ModelFacts` of the model at `ref` (a folder, .gguf file or hub id with a fast tokenizer)."""
    from fusekit.models.identity import config_identity, logit_size, model_fingerprint, tokenizer_fingerprint
    from fusekit.models.load import load_config, load_tokenizer, require_fast_tokenizer
    from fusekit.vocab.normalize import tokenizer_family

    tokenizer = require_fast_tokenizer(load_tokenizer(ref), ref)
    config = load_config(ref, False)
    local = Path(ref).expanduser()
    return ModelFacts(
        ref=ref,
        where=str(local.resolve()) if local.exists() else ref,
        weights=model_fingerprint(ref, config_identity(config)),
        tokenizer=tokenizer_fingerprint(tokenizer),
        tokenizer_family=tokenizer_family(tokenizer),
        vocab_size=logit_size(config),
        tokenizer_object=tokenizer,
    )


def run_identity(teachers: Sequence[ModelFacts], records: int, corpus: str, *, top_k: int, append_eos: bool,
                 texts_per_group: int, on_policy_ratio: float, prompt_share: float, sample_temperature: float) -> dict:
    """What a resumed `fusekit distill` must agree on beside the training options (`TrainConfig.identity`,
    which holds the loss, λ and the fusion rule): the teachers (where, weights, tokenizer), the corpus
    (`records` and the fingerprint `corpus` of them, `corpus.corpus_fingerprint`), top-k, the transfer
    method, what fixes the data order, and the policy (GKD's mixing weight and, when it samples, the prompt
    share and temperature). Flat keys, so that `loop._check_out` names each one that differs."""
    identity: dict[str, Any] = {f"teacher_{i}": t.identity() for i, t in enumerate(teachers, 1)}
    identity.update(
        corpus=f"{records} records, fingerprint {corpus[:16]}",
        top_k=int(top_k),
        transfer="bytespan",
        append_eos=bool(append_eos),
        texts_per_group=int(texts_per_group),
        on_policy_ratio=float(on_policy_ratio),
    )
    if on_policy_ratio > 0:
        identity.update(prompt_share=float(prompt_share), sample_temperature=float(sample_temperature))
    return identity


def distill(
    model: str | Path,
    teachers: Sequence[str | Path],
    data: str | Path | Sequence[str],
    out: str | Path,
    *,
    top_k: int = 10,
    field: str = "text",
    append_eos: bool = True,
    teacher_batch_size: int = 8,
    texts_per_group: int = TEXTS_PER_GROUP,
    on_policy_ratio: float = 0.0,
    prompt_share: float = 0.5,
    sample_temperature: float = 1.0,
    config: Any = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    memory_available: int | None = None,
    windows_hook: Callable[[int, list[Window]], list[Window]] | None = None,
    **options: Any,
) -> Path:
    """Train MODEL on λ·CLM + (1−λ)·fusion with TEACHERS run online over DATA; returns OUT (the trained model).

    MODEL, TEACHERS: model folders (or hub ids) with fast tokenizers; DATA: a corpus path as `fusekit
    extract` reads it, or a list of texts. `top_k`: entries kept per position of every model's
    distribution (extraction's --top-k). `options` are TrainConfig fields (`lam`, `fusion`,
    `granularity`, `loss`, `max_length`, `max_steps`, `lr`, `fsdp`, …) as for `fusekit train`; `max_length`
    also cuts the texts into windows, as `fusekit extract --max-length` does. Each teacher's parameter
    memory is printed at the start; `memory_available` (bytes; default: free on the device) caps what the
    teachers, the frozen target copy and the trained target's state may take — beyond it
    TeacherMemoryError is raised before any model is loaded. `on_policy_ratio`: GKD's mixing weight, the
    share of micro-batches trained on the target's own continuations of corpus prompts (the first
    `prompt_share` of each window; a chat's conversation before its last answer), sampled at
    `sample_temperature` and scored by the teachers (`on_policy.py`; 0: off-policy only). On-policy chat
    data needs a chat template in every model (TrainDataError otherwise, before any step).
    `windows_hook`: see `OnlineWindows`.

    Resuming (`resume=True`) continues the run in OUT only with the same training options, teachers
    (weights and tokenizers), corpus, top-k and policy (`run_identity`); anything else stops with
    TrainError naming what differs, before any model is loaded. OUT/README.md (the model card) lists the
    teachers, the loss, λ, the fusion rule and the policy.
    """
    from fusekit.models.device import resolve_dtype
    from fusekit.train.config import TrainConfigError, build_config
    from fusekit.train.ddp import init_distributed
    from fusekit.train.loop import _train

    cfg = build_config(config, **options)
    if not 0.0 <= on_policy_ratio <= 1.0:
        raise TrainConfigError(f"--on-policy-ratio must lie in [0, 1], got {on_policy_ratio}")
    if not 0.0 < prompt_share < 1.0:
        raise TrainConfigError(f"--prompt-share must lie in (0, 1), got {prompt_share}")
    if not sample_temperature > 0.0:
        raise TrainConfigError(f"--sample-temperature must be above 0, got {sample_temperature}")
    if on_policy_ratio > 0 and cfg.fsdp:
        raise TrainConfigError("on-policy sampling runs the whole target on each rank: use DDP (leave out --fsdp)")
    if not teachers:
        raise TrainDataError("give at least one teacher (--teacher)")
    refs = [str(t) for t in teachers]
    records = read_corpus(data, field)
    facts = [model_facts(ref) for ref in refs]
    if on_policy_ratio > 0 and any(r.messages is not None for r in records):
        from fusekit.models.load import load_tokenizer
        from fusekit.train.on_policy import require_chat_templates

        require_chat_templates([(str(model), load_tokenizer(str(model))), *((f.ref, f.tokenizer_object) for f in facts)])
    fingerprint = corpus_fingerprint(records)
    identity = run_identity(facts, len(records), fingerprint, top_k=top_k, append_eos=append_eos, texts_per_group=texts_per_group,
                            on_policy_ratio=on_policy_ratio, prompt_share=prompt_share, sample_temperature=sample_temperature)
    d = init_distributed()
    made: list[OnlineWindows] = []

    def source(dev, d) -> OnlineWindows:
        dtype = resolve_dtype("bf16" if dev.type == "cuda" else "fp32", dev)
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if d.is_main else None
        shards = d.world_size if cfg.fsdp and d.grouped else 1
        check_memory(str(model), refs, dev, 2 if dtype == "bfloat16" else 4, memory_available, say, shards=shards)
        frozen = load_online_model(str(model), dtype, dev, cfg.max_length)
        loaded = [load_online_model(ref, dtype, dev, cfg.max_length) for ref in refs]
        made.append(OnlineWindows(records, frozen, loaded, top_k=top_k, append_eos=append_eos, batch_size=teacher_batch_size,
                                  texts_per_group=texts_per_group, windows_hook=windows_hook))
        return made[-1]

    def objective(plan, cfg, step_module):
        from fusekit.train.on_policy import OnPolicyObjective

        return OnPolicyObjective(plan, cfg, step_module, made[-1], on_policy_ratio, prompt_share, sample_temperature)

    def card(out_dir: Path, cfg, steps: int, last: dict, world_size: int) -> None:
        from fusekit.train.model_card import write_distill_card

        teachers_card = [{"model": f.ref, "tokenizer_family": f.tokenizer_family, "vocab_size": f.vocab_size,
                          "weights": f.weights[:16]} for f in facts]
        policy = {"on_policy_ratio": on_policy_ratio, "prompt_share": prompt_share, "sample_temperature": sample_temperature}
        corpus = {"records": len(records), "fingerprint": fingerprint[:16]}
        write_distill_card(out_dir, str(model), teachers_card, cfg, steps, last, world_size, top_k=top_k,
                           transfer=identity["transfer"], policy=policy, corpus=corpus)

    return _train(str(model), None, Path(out), cfg, resume, progress, device, d, source_factory=source,
                  make_objective=objective if on_policy_ratio > 0 else None, identity_extra=identity, write_card=card)
