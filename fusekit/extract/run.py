"""`fusekit.extract`: run a causal LM over a corpus and store its top-k distributions, shard by shard.

Order of work (each step can be killed; a re-run picks up where it stopped):
1. read the corpus once: its fingerprint, number of texts and size (which fix the shards);
2. read the tokenizer and config, build the settings, and open DIR (refusing other settings);
3. for each shard of this job that is not complete: tokenise its texts, run the model over its
   windows in batches, code them, write the Parquet file atomically, then its sidecar;
4. note the complete shards in manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fusekit.corpus import (
    CorpusError,
    CorpusStats,
    Record,
    corpus_fingerprint,
    read_records,
    record_key,
    tokenize_with_offsets,
    windows_of,
)
from fusekit.extract.errors import ExtractError
from fusekit.extract.model import forward_topk, forward_topk_packed, store_vocab
from fusekit.models.device import load_net, resolve_device, resolve_dtype
from fusekit.models.identity import config_identity, logit_size, model_context, model_fingerprint, model_name, tokenizer_fingerprint
from fusekit.models.load import load_config
from fusekit.models.packing import pack_windows, packing_supported
from fusekit.store.extract_store import CODEC, DEFAULT_KNEE, DEFAULT_STEP, FORMAT, FRESH_CODEC, TOKENS_FILE, VOCAB_FILE, encode_shard
from fusekit.store.shards import (
    MANIFEST,
    MAX_SHARDS,
    ShardLock,
    StoreError,
    clean_temporaries,
    complete_shards,
    open_store,
    parse_shard,
    parse_shard_filename,
    read_manifest,
    record_shard,
    settings_digest,
    shard_filename,
    shard_is_complete,
    shard_slice,
    update_manifest,
    parquet_bytes,
    write_bytes_atomic,
)
from fusekit.store.types import Window

# A default shard holds about this many characters (~1M tokens): a killed run loses at most that much.
SHARD_CHARS = 4_000_000


@dataclass
class CorpusInfo:
    n_texts: int
    chars: int
    fingerprint: str
    stats: CorpusStats


def scan_corpus(data: str | Path, field: str) -> CorpusInfo:
    """One streaming pass: how many texts, how large, and the fingerprint of the corpus as read."""
    stats = CorpusStats()
    chars = 0

    def counted() -> Iterator[Record]:
        nonlocal chars
        for record in read_records(data, field, stats):
            chars += len(record.text) if record.text is not None else len(record_key(record))
            yield record

    fingerprint = corpus_fingerprint(counted())
    if stats.texts == 0:
        detail = f" ({stats.summary()})" if stats.skipped else ""
        raise CorpusError(f"no texts in {data}{detail}")
    return CorpusInfo(stats.texts, chars, fingerprint, stats)


def default_num_shards(info: CorpusInfo) -> int:
    return max(1, min(info.n_texts, MAX_SHARDS, math.ceil(info.chars / SHARD_CHARS)))


def _records_by_shard(data, field: str, n_texts: int, num_shards: int, wanted: list[int]) -> Iterator[tuple[int, list[Record]]]:
    """(shard index, its records) for the wanted shards, in one streaming pass over the corpus."""
    todo = sorted(wanted)
    if not todo:
        return
    ranges = {i: shard_slice(n_texts, i, num_shards) for i in todo}
    pos = 0
    current: list[Record] = []
    records = read_records(data, field)
    for i in todo:
        r = ranges[i]
        current = []
        for record in records:
            if pos >= r.start:
                current.append(record)
            pos += 1
            if pos >= r.stop:
                break
        if len(current) != len(r):
            raise CorpusError(f"{data} changed while extracting (fewer texts than the first read found); re-run")
        yield i, current


def _check_folder(out: Path, num_shards: int, digest: str) -> None:
    """Refuse a folder that is not this run's store: foreign files, shards of another run."""
    import polars as pl

    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"--out {out} is a file, not a folder")
    has_manifest = (out / MANIFEST).is_file()
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not has_manifest and entries:
        raise StoreError(f"--out {out} is not empty and not a fusekit store; give a new or empty folder")
    for path in entries:
        parsed = parse_shard_filename(path.name)
        if parsed is None:
            continue
        if parsed[1] != num_shards:
            raise StoreError(f"{path} is a shard of a {parsed[1]}-shard run, this run has {num_shards}: it comes from another run; use another --out")
        side = out / f"{path.name}.json"
        if side.is_file():
            continue  # sidecars are checked against the settings below
        try:
            meta = pl.read_parquet_metadata(path)
        except Exception:  # a truncated file of ours cannot be read; it is redone
            continue
        if meta.get("fusekit.settings_sha256") not in (None, digest):
            raise StoreError(f"{path} belongs to another extraction run (different settings); move it away or use another --out")
    theirs = {name for name in (p.name[: -len(".json")] for p in out.glob("part-*.parquet.json"))}
    ours = set(complete_shards(out)) if has_manifest else set()
    for name in sorted(theirs - ours):
        if (out / name).is_file():
            raise StoreError(f"{out / name} has a sidecar from another extraction run; move it away or use another --out")


def _bar(progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} tok/s" if task.speed else "… tok/s", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), Rate(),
        TimeRemainingColumn(), disable=not progress,
    )


def extract(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    top_k: int = 10,
    max_length: int = 2048,
    batch_size: int = 8,
    shard: str | tuple[int, int] | None = None,
    num_shards: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    field: str = "text",
    trust_remote_code: bool = False,
    append_eos: bool = True,
    progress: bool = True,
    pack: bool = True,
    ray: str | None = None,
    ray_workers: int | None = None,
) -> Path:
    """Run MODEL over DATA and store, per token, its top-k next-token distribution and CE in OUT.

    MODEL: a model folder, a .gguf file or a hub id. DATA: a text file (one text per line), a folder of
    text files, JSONL (`field`, or chat `messages`) or Parquet. Texts are cut into windows of
    min(max_length, model context) tokens. The corpus is split by text into `num_shards` shards (default:
    about 1M tokens each); `shard="I/N"` does only shard I of N (0-based), so N jobs can share the work.
    `append_eos` (default, as the FuseLLM reference) ends every plain text with the tokenizer's
    end-of-sequence token. Every window keeps its text, so alignment works on exact byte spans.
    Complete shards are skipped, so re-running after a crash resumes; a shard another process is writing
    (a per-shard lock) is skipped with a message. A re-run without `num_shards` reuses the store's.
    `pack`: several windows per row of `max_length` tokens (attention kept inside each window), so no
    compute goes to padding; models that do not keep packed windows apart get padded batches.
    `ray` ("auto", an address or "local"): the shards run on `ray_workers` Ray actors (default: one per
    GPU of the cluster, else one per CPU), each loading the model once; the files are byte-identical to
    a serial run's. Returns OUT.
    """
    from fusekit.models.load import load_tokenizer, require_fast_tokenizer

    if top_k < 1:
        raise ExtractError(f"--top-k must be at least 1, got {top_k}")
    if max_length < 1 or batch_size < 1:
        raise ExtractError("--max-length and --batch-size must be at least 1")
    only: int | None = None
    if shard is not None:
        only, count = parse_shard(shard) if isinstance(shard, str) else (int(shard[0]), int(shard[1]))
        parse_shard(f"{only}/{count}")
        if num_shards is not None and num_shards != count:
            raise ExtractError(f"--shard {only}/{count} and --num-shards {num_shards} disagree")
        num_shards = count
    if num_shards is not None and not 1 <= num_shards <= MAX_SHARDS:
        raise ExtractError(f"--num-shards must be between 1 and {MAX_SHARDS}")
    out = Path(out)
    info = scan_corpus(data, field)
    if num_shards is None:
        num_shards = _store_num_shards(out) or default_num_shards(info)
    if num_shards > info.n_texts:
        raise ExtractError(f"{num_shards} shards for {info.n_texts} texts: some shards would be empty; use at most {info.n_texts}")

    if ray is None:
        dev = resolve_device(device)
        dtype_name = resolve_dtype(dtype, dev)
    else:  # the model runs on the workers: the driver needs no GPU, only the dtype for the settings
        dev = _device_kind(device or "cpu")
        dtype_name = resolve_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"), dev)
    tokenizer = require_fast_tokenizer(load_tokenizer(model, trust_remote_code=trust_remote_code), model)
    config = load_config(model, trust_remote_code)
    vocab_size = logit_size(config)
    if top_k > vocab_size:
        raise ExtractError(f"--top-k {top_k} exceeds the vocabulary ({vocab_size})")
    vocab = store_vocab(tokenizer, vocab_size)
    context = model_context(config)
    window = min(max_length, context) if context else max_length
    from fusekit.vocab.normalize import token_scheme

    settings = {
        "model": model_name(model),
        "model_fingerprint": model_fingerprint(model, config_identity(config)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "scheme": token_scheme(tokenizer).value,
        "vocab_size": vocab_size,
        "k": top_k,
        "max_length": window,
        "field": field,
        "corpus_fingerprint": info.fingerprint,
        "n_texts": info.n_texts,
        "num_shards": num_shards,
        "codec": _store_codec(out),
        "codec_step": DEFAULT_STEP,
        "codec_knee": DEFAULT_KNEE,
        "dtype": dtype_name,
        "append_eos": bool(append_eos),
    }
    digest = settings_digest(settings)
    if (out / MANIFEST).is_file():
        open_store(out, FORMAT, settings)  # other settings: refused before anything else is looked at
    _check_folder(out, num_shards, digest)
    from fusekit.vocab.info import vocab_info

    _open(out, settings, vocab, info, vocab_info(tokenizer, vocab_size).as_json())
    clean_temporaries(out)

    shards = [only] if only is not None else list(range(num_shards))
    pending = [i for i in shards if not shard_is_complete(out, shard_filename(i, num_shards))]
    busy: list[str] = []
    if pending and ray is not None:
        from fusekit.extract.ray_runner import ExtractJob, run_on_ray

        job = ExtractJob(str(model), dtype_name, device, trust_remote_code, settings, digest, num_shards, info.n_texts, batch_size, pack)
        log = ShardLog(len(pending), enabled=progress)
        locks: dict[int, ShardLock] = {}

        def claimed() -> Iterator[tuple[int, list[Record]]]:
            for index, records in _records_by_shard(data, field, info.n_texts, num_shards, pending):
                name = shard_filename(index, num_shards)
                lock = ShardLock(out, name)
                if not lock.acquire():
                    busy.append(name)
                    log.say(f"{out / name}: another process (pid {lock.holder()}) is writing it; skipped")
                elif shard_is_complete(out, name):
                    lock.release()
                else:
                    locks[index] = lock
                    yield index, records

        try:
            for done in run_on_ray(ray, job, claimed(), ray_workers):
                publish_shard(out, done)
                locks.pop(done.index).release()
                log.done(f"shard {done.index + 1}/{num_shards}", done.tokens)
        finally:
            for lock in locks.values():
                lock.release()
    elif pending:
        net = load_net(model, dtype_name, dev, trust_remote_code)
        log = ShardLog(len(pending), enabled=progress)
        with _bar(progress) as bar:
            for index, records in _records_by_shard(data, field, info.n_texts, num_shards, pending):
                name = shard_filename(index, num_shards)
                with ShardLock(out, name) as lock:
                    if not lock.acquire():
                        busy.append(name)
                        log.say(f"{out / name}: another process (pid {lock.holder()}) is writing it; skipped")
                        continue
                    if shard_is_complete(out, name):  # finished by another process meanwhile
                        continue
                    done = compute_shard(
                        net, tokenizer, records, index, num_shards, info.n_texts, settings, digest, batch_size, bar, pack
                    )
                    publish_shard(out, done)
                log.done(f"shard {index + 1}/{num_shards}", done.tokens)
    _note_complete(out, num_shards)
    if busy:
        log.say(
            f"{len(busy)} shard(s) were being written by another process and are not checked here; "
            f"re-run (or `fusekit inspect {out}`) once it has finished"
        )
    return out


def _device_kind(device: str):
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ExtractError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None


def _store_num_shards(out: Path) -> int | None:
    """The shard count of an existing extraction store at OUT (so a re-run need not repeat --num-shards)."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out)
    if manifest.get("format") != FORMAT:
        return None
    value = manifest.get("settings", {}).get("num_shards")
    return value if isinstance(value, int) and 1 <= value <= MAX_SHARDS else None


def _store_codec(out: Path) -> str:
    """CODEC, or FRESH_CODEC when OUT is an extraction store written with it: a resume finishes an
    older store in its own format (its shards must agree), a new store gets the current one."""
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("format") == FORMAT and manifest.get("settings", {}).get("codec") == FRESH_CODEC:
            return FRESH_CODEC
    return CODEC


class ShardLog:
    """One line per finished shard on stderr (tokens/s, ETA) when the progress bar cannot show: outside a
    terminal (a batch job's log file). Quiet with progress off, and in a terminal the bar says it all."""

    def __init__(self, shards: int, enabled: bool = True):
        import sys
        import time

        self.total, self.finished, self.tokens = shards, 0, 0
        self.start = time.perf_counter()
        self.enabled = enabled and not sys.stderr.isatty()

    def say(self, line: str) -> None:
        import sys

        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def done(self, label: str, tokens: int) -> None:
        import time

        self.finished += 1
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        left = elapsed / self.finished * (self.total - self.finished)
        eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        self.say(f"{label}: {tokens:,} tokens, {rate:,.0f} tokens/s; {self.finished}/{self.total} of this run done, ETA {eta}")


def _open(out: Path, settings: dict, vocab: list[str], info: CorpusInfo, tokens: dict) -> None:
    vocab_bytes = (json.dumps(vocab, ensure_ascii=False) + "\n").encode("utf-8")
    vocab_sha = hashlib.sha256(vocab_bytes).hexdigest()
    extra = {
        "extra_files": [VOCAB_FILE, TOKENS_FILE],
        "vocab_sha256": vocab_sha,
        "corpus": {"texts": info.n_texts, "skipped_empty": info.stats.empty, "skipped_non_utf8": info.stats.non_utf8},
    }
    vocab_path = out / VOCAB_FILE
    if not vocab_path.is_file() or hashlib.sha256(vocab_path.read_bytes()).hexdigest() != vocab_sha:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {out}: {exc.strerror or exc}") from None
        write_bytes_atomic(vocab_bytes, vocab_path)
    tokens_bytes = (json.dumps(tokens, sort_keys=True) + "\n").encode("utf-8")
    if not (out / TOKENS_FILE).is_file() or (out / TOKENS_FILE).read_bytes() != tokens_bytes:
        write_bytes_atomic(tokens_bytes, out / TOKENS_FILE)
    open_store(out, FORMAT, settings, extra=extra)


def compute_shard(net, tokenizer, records, index, num_shards, n_texts, settings, digest, batch_size, bar, pack: bool = True) -> "ShardOutput":
    """Run the model over one shard's records and code it (nothing is written here)."""
    k, vocab_size, window = settings["k"], settings["vocab_size"], settings["max_length"]
    first = shard_slice(n_texts, index, num_shards).start
    pieces: list[tuple[int, int, int, int, np.ndarray, np.ndarray, np.ndarray | None, str]] = []
    for offset, record in enumerate(records):
        tok = tokenize_with_offsets(tokenizer, record, settings.get("append_eos", False))
        if tok.input_ids.size and (tok.input_ids.min() < 0 or tok.input_ids.max() >= vocab_size):
            raise ExtractError(f"text {first + offset}: the tokenizer produced an id outside the model's {vocab_size} logits")
        n = len(tok.input_ids)
        for w, (s, e) in enumerate(windows_of(tok.input_ids, window)):
            char_end = int(tok.offsets[e]) if e < n else len(tok.text)
            char_start = 0 if w == 0 else int(tok.offsets[s])  # window 0 holds the text's start, even untokenised
            pieces.append(
                (first + offset, w, char_start, char_end, tok.input_ids[s:e], tok.offsets[s:e],
                 None if tok.mask is None else tok.mask[s:e], tok.text[char_start:char_end])
            )
    name = shard_filename(index, num_shards)
    tokens = sum(len(p[4]) for p in pieces)
    task = bar.add_task(f"{settings['model']} {index + 1}/{num_shards}", total=tokens)
    results: dict[int, Window] = {}

    def keep(i: int, r) -> None:
        text_id, w, cs, ce_, ids, offs, mask, text = pieces[i]
        pred = r.ce[:-1].astype(np.float64)
        results[i] = Window(
            text_id=text_id, window=w, char_start=cs, char_end=ce_, input_ids=ids, offsets=offs,
            topk_ids=r.topk_ids, topk_logp=r.topk_logp, ce=r.ce,
            mean_ce=float(pred.mean()) if pred.size else float("nan"), loss_mask=mask, text=text,
        )

    # The grouping is a pure function of the shard's window lengths, so the bytes are deterministic.
    token_ids = [p[4] for p in pieces]
    if pack and packing_supported(net, vocab_size):
        rows = pack_windows([len(t) for t in token_ids], window)  # each row ≤ one window of tokens
        for lo in range(0, len(rows), batch_size):
            group = rows[lo : lo + batch_size]
            for i, r in forward_topk_packed(net, token_ids, group, k, vocab_size).items():
                keep(i, r)
            bar.update(task, advance=sum(len(token_ids[i]) for row in group for i in row))
    else:
        # Longest first, so a batch pads little.
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][4]))
        for lo in range(0, len(order), batch_size):
            chosen = order[lo : lo + batch_size]
            for i, r in zip(chosen, forward_topk(net, [token_ids[i] for i in chosen], k, vocab_size)):
                keep(i, r)
            bar.update(task, advance=sum(len(token_ids[i]) for i in chosen))
    windows = [results[i] for i in range(len(pieces))]
    frame, meta, stats = encode_shard(
        windows, k=k, vocab_size=vocab_size, step=settings["codec_step"], knee=settings["codec_knee"],
        metadata={"fusekit.settings_sha256": digest, "fusekit.shard": f"{index}/{num_shards}"},
        primed=settings.get("codec", CODEC) != FRESH_CODEC,
    )
    data = parquet_bytes(frame, meta)
    span = shard_slice(n_texts, index, num_shards)
    info = {
        **stats.as_dict(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": frame.height,
        "texts": [span.start, span.stop],
    }
    bar.update(task, visible=False)
    return ShardOutput(index, name, data, info, tokens)


@dataclass
class ShardOutput:
    """One computed shard, not yet written: its Parquet bytes and sidecar entries."""

    index: int
    name: str
    data: bytes
    info: dict
    tokens: int


def publish_shard(out: Path, shard: ShardOutput) -> None:
    """Write the shard atomically, then its sidecar (which marks it complete)."""
    write_bytes_atomic(shard.data, out / shard.name)
    record_shard(out, shard.name, shard.info)


def _note_complete(out: Path, num_shards: int) -> None:
    """The manifest's summary of the complete shards (sidecars stay the source of truth)."""
    done = complete_shards(out)
    names = [shard_filename(i, num_shards) for i in range(num_shards)]
    summary = {n: {"rows": done[n].get("rows"), "tokens": done[n].get("tokens"), "sha256": done[n].get("sha256")} for n in names if n in done}
    manifest = read_manifest(out)
    if manifest.get("shards") != summary or manifest.get("complete") != (len(summary) == num_shards):
        update_manifest(out, {"shards": summary, "complete": len(summary) == num_shards})
