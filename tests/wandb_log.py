"""Read a W&B offline run's transaction log (`run-ID.wandb`) with W&B's own record schema.

The file is a `:W&B` header (ident, magic 0xBEE1, version) followed by LevelDB-log records in 32 KiB
blocks (7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST); each record's payload is a
`wandb_internal_pb2.Record`. `wandb sync` replays the same records.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")  # ":W&B", 0xBEE1, version
RECORD = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    ident, magic, _version = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER.size, b""
    while pos + RECORD.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD.size:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = RECORD.unpack_from(data, pos)
        body = data[pos + RECORD.size : pos + RECORD.size + length]
        pos += RECORD.size + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
            pending = b""
    return out


def read_run(folder: Path) -> dict:
    """{"history": [{key: value, …, "_step": n}, …], "config": {key: value}} of an offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(folder).glob("run-*.wandb")
    history, config = [], {}
    for payload in payloads(log):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            history.append(row)
        elif kind in ("config", "run"):  # the config comes with the run record, later updates on their own
            for item in (record.config if kind == "config" else record.run.config).update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config}
