"""The hashes AUTOMATIC1111, Forge and Civitai name model files by, computed one way for everyone.

    lora_hash(stream)                # what A1111 calls a LoRA: its sshs_model_hash, else the data hash
    safetensors_data_sha256(stream)  # sha256 of a safetensors file after its header
    checkpoint_short_hash(sha256)    # the "Model hash" A1111 writes for a checkpoint file

A1111 names a LoRA by the sha256 of the bytes after the safetensors header (the 8-byte
little-endian header length, then the JSON header), so editing the metadata never changes it;
it prefers the `sshs_model_hash` metadata key when a file has one, and its PNGs' `Lora hashes`
hold the first 12 hex digits (`LORA_SHORT_HASH`). A checkpoint's "Model hash" is the first 10
hex digits of the sha256 of the whole file. loraloop writes `sshs_model_hash` into every adapter
it writes (training/adapter_files.py), and the service reads it back when it scans the adapters
directory (generation/adapters.py), so a PNG, A1111 and Civitai all name a LoRA the same way.

Floor: standard library only; generation/ and training/ both use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import BinaryIO

# The safetensors metadata key A1111 (and kohya's sd-scripts, which writes it) read a LoRA's hash from.
MODEL_HASH_KEY = "sshs_model_hash"
LORA_SHORT_HASH = 12
CHECKPOINT_SHORT_HASH = 10
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def safetensors_data_sha256(stream: BinaryIO) -> str:
    """The sha256 of everything after a safetensors header: the tensors' bytes, not the metadata."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def safetensors_metadata(stream: BinaryIO) -> dict[str, str]:
    """The `__metadata__` of a safetensors header ({} when there is none or the header is unreadable)."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    try:
        header = json.loads(stream.read(header_length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def lora_hash(stream: BinaryIO) -> str:
    """A1111's full hash of a LoRA file: its `sshs_model_hash` when that is a sha256, else the data hash.

    Takes the file's bytes as a stream, so a caller that has already read and checked them (the
    service's adapter scan) hashes exactly what it will load."""
    recorded = str(safetensors_metadata(stream).get(MODEL_HASH_KEY, "")).lower()
    return recorded if _SHA256_RE.match(recorded) else safetensors_data_sha256(stream)


def file_sha256(path: Path) -> str:
    """The sha256 of a whole file, read in chunks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_short_hash(sha256: str) -> str:
    """The "Model hash" A1111 writes for a checkpoint whose whole-file sha256 this is."""
    return sha256[:CHECKPOINT_SHORT_HASH]
