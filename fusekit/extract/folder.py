"""The output folder of an extraction run: checked before work, opened, a shard published, completion noted.

Everything here reads or writes OUT itself; the shard files' bytes come from `shard.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fusekit.extract.corpus_shards import CorpusInfo
from fusekit.extract.shard import ShardOutput
from fusekit.store.atomic import write_bytes_atomic
from fusekit.store.errors import StoreError
from fusekit.store.extract_format import CODEC, FORMAT, FRESH_CODEC, TOKENS_FILE, VOCAB_FILE
from fusekit.store.shards import (
    MANIFEST,
    MAX_SHARDS,
    complete_shards,
    open_store,
    parse_shard_filename,
    read_manifest,
    record_shard,
    shard_filename,
    update_manifest,
)


def check_folder(out: Path, num_shards: int, digest: str) -> None:
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


def store_num_shards(out: Path) -> int | None:
    """The shard count of an existing extraction store at OUT (so a re-run need not repeat --num-shards)."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out)
    if manifest.get("format") != FORMAT:
        return None
    value = manifest.get("settings", {}).get("num_shards")
    return value if isinstance(value, int) and 1 <= value <= MAX_SHARDS else None


def store_codec(out: Path) -> str:
    """CODEC, or FRESH_CODEC when OUT is an extraction store written with it: a resume finishes an
    older store in its own format (its shards must agree), a new store gets the current one."""
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("format") == FORMAT and manifest.get("settings", {}).get("codec") == FRESH_CODEC:
            return FRESH_CODEC
    return CODEC


def open_folder(out: Path, settings: dict, vocab: list[str], info: CorpusInfo, tokens: dict) -> None:
    """Write vocab.json and tokens.json (unless they already hold these bytes), then open the store's
    manifest (created on first use; StoreError when OUT was written with other settings)."""
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


def publish_shard(out: Path, shard: ShardOutput) -> None:
    """Write the shard atomically, then its sidecar (which marks it complete)."""
    write_bytes_atomic(shard.data, out / shard.name)
    record_shard(out, shard.name, shard.info)


def note_complete(out: Path, num_shards: int) -> None:
    """The manifest's summary of the complete shards (sidecars stay the source of truth)."""
    done = complete_shards(out)
    names = [shard_filename(i, num_shards) for i in range(num_shards)]
    summary = {n: {"rows": done[n].get("rows"), "tokens": done[n].get("tokens"), "sha256": done[n].get("sha256")} for n in names if n in done}
    manifest = read_manifest(out)
    if manifest.get("shards") != summary or manifest.get("complete") != (len(summary) == num_shards):
        update_manifest(out, {"shards": summary, "complete": len(summary) == num_shards})
