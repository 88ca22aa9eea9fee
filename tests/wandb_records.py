"""Read an offline W&B run's ``.wandb`` file in tests.

wandb 0.19+ has no Python reader for its transaction log any more (``wandb.sdk.internal.datastore``
went with the Go core), so this is the format as that module wrote it: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then LevelDB's log format — 32 KiB blocks of chunks, each
``crc32 (4) | length (2, little endian) | type (1: full, 2: first, 3: middle, 4: last)`` — whose
reassembled payloads are ``wandb_internal_pb2.Record`` protobufs (that module is wandb's own).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path} is not a W&B transaction log (header {data[:7]!r})"
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    """What one offline run folder holds: the ``run`` record's fields and every history row."""

    run_id: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(wandb_file: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    out = OfflineRun()
    for payload in _payloads(wandb_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run_id, out.group, out.job_type = record.run.run_id, record.run.run_group, record.run.job_type
            out.config.update({_item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out.config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    return out
