"""`fusekit.extract`: run a causal LM over a corpus and store its top-k distributions, shard by shard.

Order of work (each step can be killed; a re-run picks up where it stopped):
1. read the corpus once: its fingerprint, number of texts and size (which fix the shards);
2. read the tokenizer and config, build the settings, and open DIR (refusing other settings);
3. for each shard of this job that is not complete: tokenise its texts, run the model over its
   windows in batches, code them, write the Parquet file atomically, then its sidecar;
4. note the complete shards in manifest.json.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

from fusekit.corpus import Record
from fusekit.extract.corpus_shards import default_num_shards, records_by_shard, save_index, scan_corpus
from fusekit.extract.errors import ExtractError
from fusekit.extract.folder import check_folder, note_complete, open_folder, publish_shard, store_codec, store_num_shards
from fusekit.extract.model import store_vocab, whole_logits_note
from fusekit.extract.ray_runner import ExtractJob, run_on_ray
from fusekit.extract.shard import compute_shard
from fusekit.extract.shard_log import ShardLog, token_bar
from fusekit.models.device import load_net, resolve_device, resolve_dtype
from fusekit.models.identity import config_identity, logit_size, model_context, model_fingerprint, model_name, tokenizer_fingerprint
from fusekit.models.load import load_config, load_tokenizer, require_fast_tokenizer
from fusekit.store.atomic import clean_temporaries
from fusekit.store.extract_format import DEFAULT_KNEE, DEFAULT_STEP, FORMAT
from fusekit.store.lock import ShardLock
from fusekit.store.shards import (
    MANIFEST,
    MAX_SHARDS,
    open_store,
    parse_shard,
    settings_digest,
    shard_filename,
    shard_is_complete,
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
    info = scan_corpus(data, field, out)
    if num_shards is None:
        num_shards = store_num_shards(out) or default_num_shards(info)
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
        "codec": store_codec(out),
        "codec_step": DEFAULT_STEP,
        "codec_knee": DEFAULT_KNEE,
        "dtype": dtype_name,
        "append_eos": bool(append_eos),
    }
    digest = settings_digest(settings)
    if (out / MANIFEST).is_file():
        open_store(out, FORMAT, settings)  # other settings: refused before anything else is looked at
    check_folder(out, num_shards, digest)
    from fusekit.vocab.info import vocab_info

    open_folder(out, settings, vocab, info, vocab_info(tokenizer, vocab_size).as_json())
    clean_temporaries(out)
    save_index(out, info, field)

    shards = [only] if only is not None else list(range(num_shards))
    pending = [i for i in shards if not shard_is_complete(out, shard_filename(i, num_shards))]
    busy: list[str] = []
    if pending and ray is not None:
        job = ExtractJob(str(model), dtype_name, device, trust_remote_code, settings, digest, num_shards, info.n_texts, batch_size, pack)
        log = ShardLog(len(pending), enabled=progress)
        locks: dict[int, ShardLock] = {}

        def claimed() -> Iterator[tuple[int, list[Record]]]:
            for index, records in records_by_shard(info, field, num_shards, pending):
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
        if (note := whole_logits_note(net, batch_size, window, vocab_size)) is not None:
            warnings.warn(note, stacklevel=2)
        log = ShardLog(len(pending), enabled=progress)
        with token_bar(progress) as bar:
            for index, records in records_by_shard(info, field, num_shards, pending):
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
    note_complete(out, num_shards)
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
