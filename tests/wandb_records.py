"""Read an offline W&B run back from the file wandb writes (``run-<id>.wandb``), for the tests.

Current wandb writes no wandb-summary.json offline; everything is in that one file:

- a 7-byte header: ``:W&B``, the magic 0xBEE1 (little-endian) and a format version byte 0;
- then a LevelDB-style log: 32 KiB blocks, each holding chunks of a 7-byte chunk header (CRC-32 of
  the type byte and the payload, payload length: both little-endian; type: 1 full, 2 first,
  3 middle, 4 last) and the payload. A chunk never straddles a block: a block tail shorter than a
  chunk header is zero padding. Block offsets count from the start of the file (header included).
- each reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record`` message.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: str | Path) -> list[bytes]:
    """The record payloads of a .wandb file, in order, with every chunk's checksum verified."""
    data = Path(path).read_bytes()
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    payloads, parts = [], None
    pos = len(FILE_HEADER)
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # padding at the end of a block
            pos += room
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if crc == length == kind == 0:  # a zero-filled tail (the writer pre-allocated it)
            pos += room
            continue
        start = pos + CHUNK_HEADER.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: damaged chunk at byte {pos}")
        pos = start + length
        if kind == FULL:
            payloads.append(payload)
        elif kind == FIRST:
            parts = [payload]
        elif kind in (MIDDLE, LAST) and parts is not None:
            parts.append(payload)
            if kind == LAST:
                payloads.append(b"".join(parts))
                parts = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {pos}")
    return payloads


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What a test needs from one offline run: its id, name, job type, config, tags, group,
    history, summary, the x-axis of each metric pattern (``define_metric``) and exit code (None
    when the file holds no exit record, i.e. the run was never finished)."""

    run_id: str = ""
    name: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    group: str = ""
    step_metrics: dict = field(default_factory=dict)  # metric name or glob -> its step metric
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None


def read_run(path: str | Path) -> OfflineRun:
    """Fold the Record messages of a .wandb file into an :class:`OfflineRun`."""
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name = record.run.run_id, record.run.display_name
            run.job_type = record.run.job_type
            run.tags = list(record.run.tags)
            run.group = record.run.run_group
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "metric" and record.metric.step_metric:
            name = record.metric.name or record.metric.glob_name
            run.step_metrics[name] = record.metric.step_metric
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_run_files(root: str | Path) -> list[Path]:
    """Every offline run file under ``root`` (``wandb/offline-run-*/run-*.wandb``), oldest first."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
