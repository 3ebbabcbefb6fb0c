"""The LoRA adapter directory: what is there, which versions, and which files are safe to load.

Layout (the training `publish` command writes the first form):

    ADAPTERS_DIR/pixel/v1.safetensors   versioned: "pixel" is the highest vN, "pixel@1" pins one
    ADAPTERS_DIR/ink.safetensors        unversioned

Only safetensors are read. Pickle files (.bin, .ckpt, .pt, .pth, .pkl) are refused, because
unpickling one can run any code its author chose. A file that does not open as safetensors or
holds no LoRA weights is skipped with a logged error, and the others keep serving.

Only regular files are opened, and without blocking: a FIFO named x.safetensors would otherwise
block the reading thread inside safetensors, holding the GIL, and freeze the whole service. A
symlink is followed only while it stays inside the adapters directory. A file is read once into
memory (at most MAX_ADAPTER_BYTES), and its sha256 is of those bytes; the worker reads it again
with `AdapterFile.read_verified`, which refuses bytes other than the ones scanned, so the hash a
job reports is the hash of what it loaded. Descriptions are cut to one line of
MAX_DESCRIPTION_CHARS, without control characters, before anyone lists them.

Scanning hashes files, so it is blocking: the server runs `scan()` on an executor thread. The
result is an immutable `AdapterCatalog` swapped in whole, so readers never see half a scan.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from generation.contract import ADAPTER_NAME_RE, AdapterInfo, AdapterRef, ErrorCode, InvalidRequest
from generation.text import one_line
from loraloop.hashes import lora_hash

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
VERSION_FILE_RE = re.compile(r"\Av([0-9]{1,6})\.safetensors\Z")
# SDXL LoRAs of rank 128 are a few hundred MB; a file past this is not an adapter worth holding in memory.
MAX_ADAPTER_BYTES = 1 << 30
# The safetensors header (tensor index and metadata); kohya's training metadata runs to a few hundred KB.
MAX_HEADER_BYTES = 16 << 20
MAX_DESCRIPTION_CHARS = 500
MAX_BASE_MODEL_CHARS = 200


@dataclass(frozen=True)
class AdapterFile:
    """One loadable adapter version on disk."""

    name: str
    version: int | None
    path: Path
    sha256: str
    description: str = ""
    base_model: str = ""
    latest: bool = True
    # A1111's hash of the file (loraloop.hashes.lora_hash): what a PNG's `Lora hashes` names it by.
    a1111_hash: str = ""

    @property
    def label(self) -> str:
        """How people write it: "pixel@3", or "ink" for an unversioned file."""
        return self.name if self.version is None else f"{self.name}@{self.version}"

    def read_verified(self) -> bytes:
        """The file's bytes, if they are still the ones scanned; AdapterFileError or OSError otherwise."""
        data = read_adapter(self.path)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise AdapterFileError("changed since the adapters directory was scanned")
        return data

    @contextlib.contextmanager
    def verified_copy(self) -> Iterator[Path]:
        """A private file holding the very bytes the scan hashed, for loaders that want a path
        (diffusers reads a LoRA's config, alpha included, from the file's metadata); a file
        swapped in the adapters directory since the scan raises AdapterFileError here instead
        of being loaded under the old hash (and so does an unreadable one: only reading raises it)."""
        try:
            data = self.read_verified()
        except OSError as exc:
            raise AdapterFileError(f"cannot read it ({exc.strerror or exc})") from exc
        with tempfile.TemporaryDirectory(prefix="loraloop-adapter-") as folder:
            copy = Path(folder) / "adapter.safetensors"
            copy.write_bytes(data)
            yield copy

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            name=self.name,
            version=self.version,
            sha256=self.sha256,
            description=self.description,
            base_model=self.base_model,
            latest=self.latest,
        )


@dataclass(frozen=True)
class AdapterCatalog:
    """A snapshot of the directory: every usable adapter, by name, versions ascending."""

    adapters: dict[str, tuple[AdapterFile, ...]]

    def files(self) -> list[AdapterFile]:
        return [f for name in sorted(self.adapters) for f in self.adapters[name]]

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def resolve(self, ref: AdapterRef) -> AdapterFile:
        """The file a request means; the error lists what is available."""
        name, _, version = ref.name.partition("@")
        versions = self.adapters.get(name)
        if not versions:
            available = ", ".join(self.names()) or "none (the adapters directory is empty)"
            raise InvalidRequest(
                f"Unknown adapter {name!r}. Available adapters: {available}.", ErrorCode.UNKNOWN_ADAPTER
            )
        if not version:
            return versions[-1]
        for candidate in versions:
            if candidate.version == int(version):
                return candidate
        known = ", ".join(f.label for f in versions)
        raise InvalidRequest(
            f"Adapter {name!r} has no version {version}. Available: {known}.", ErrorCode.UNKNOWN_ADAPTER
        )


class AdapterDirectory:
    """Scans ADAPTERS_DIR into an `AdapterCatalog`, re-hashing only files that changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # (path, size, mtime_ns) -> AdapterFile fields read from it, so a reload only reads new files.
        self._seen: dict[tuple[str, int, int], tuple[str, str, str, str]] = {}

    def scan(self) -> AdapterCatalog:
        found: dict[str, list[AdapterFile]] = {}
        if not self.directory.is_dir():
            return AdapterCatalog({})
        root = self.directory.resolve()
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith("."):
                continue
            target = _inside(entry, root)
            if target is None:
                continue
            if target.is_dir():
                if not ADAPTER_NAME_RE.match(entry.name):
                    log.warning("adapters: skipping %s: not a valid adapter name", entry)
                    continue
                for file in sorted(target.iterdir()):
                    if _refused(file):
                        continue
                    match = VERSION_FILE_RE.match(file.name)
                    if not match:
                        if file.is_file():
                            log.warning("adapters: skipping %s: expected files named vN.safetensors", file)
                        continue
                    file_target = _inside(file, root)
                    if file_target is not None:
                        self._add(found, entry.name, int(match.group(1)), file_target)
            elif entry.suffix == ".safetensors":
                if not ADAPTER_NAME_RE.match(entry.stem):
                    log.warning("adapters: skipping %s: not a valid adapter name", entry)
                    continue
                self._add(found, entry.stem, None, target)
            else:
                _refused(entry)
        catalog: dict[str, tuple[AdapterFile, ...]] = {}
        for name, files in found.items():
            if any(f.version is None for f in files) and any(f.version is not None for f in files):
                log.warning("adapters: %s exists both as %s.safetensors and as a folder; using the folder",
                            name, name)
                files = [f for f in files if f.version is not None]
            files.sort(key=lambda f: f.version or 0)
            last = len(files) - 1
            catalog[name] = tuple(
                AdapterFile(f.name, f.version, f.path, f.sha256, f.description, f.base_model, i == last, f.a1111_hash)
                for i, f in enumerate(files)
            )
        return AdapterCatalog(catalog)

    def _add(self, found: dict[str, list[AdapterFile]], name: str, version: int | None, path: Path) -> None:
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise AdapterFileError("not a regular file")
            key = (str(path), info.st_size, info.st_mtime_ns)
            if key not in self._seen:
                self._seen[key] = inspect_adapter(read_adapter(path))
            sha256, description, base_model, a1111_hash = self._seen[key]
        except AdapterFileError as exc:
            log.error("adapters: skipping %s: %s", path, exc)
            return
        except OSError as exc:
            log.error("adapters: skipping %s: cannot read it (%s)", path, exc.strerror or exc)
            return
        found.setdefault(name, []).append(
            AdapterFile(name, version, path, sha256, description, base_model, a1111_hash=a1111_hash))


class AdapterFileError(Exception):
    """A file in the adapters directory that is not a usable LoRA."""


def _refused(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        log.error("adapters: refusing %s: pickle files can run code when loaded; convert it to "
                  ".safetensors", path)
        return True
    return False


def _inside(path: Path, root: Path) -> Path | None:
    """`path` with its symlinks resolved, or None (logged) when that leaves the adapters directory."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        log.warning("adapters: skipping %s: cannot resolve it (%s)", path, exc)
        return None
    if resolved != root and root not in resolved.parents:
        log.warning("adapters: skipping %s: a symlink out of the adapters directory", path)
        return None
    return resolved


# Bytes per element of each safetensors dtype (the format's own names).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _tensor_names(header: object, buffer_bytes: int) -> list[str]:
    """The tensors a safetensors header declares, checked against the bytes after it the way the
    format requires: each tensor's span fits its dtype and shape, and the spans tile the buffer
    with no hole or overlap. That refuses a file cut short or padded after a valid header without
    deserialising anything, so listing adapters never imports torch. ValueError when it fails."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            size = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has no valid dtype, shape and offsets") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != count * size:
            raise ValueError(f"tensor {name!r}: its offsets do not match its dtype and shape")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError("the tensors leave a gap or overlap in the data")
        position = end
    if position != buffer_bytes:
        raise ValueError(f"the header describes {position} bytes of tensors, the file holds {buffer_bytes}")
    return [name for name in header if name != "__metadata__"]


def read_adapter(path: Path) -> bytes:
    """The bytes of the regular file at `path`, or AdapterFileError; never blocks, never follows
    a symlink at `path` itself (the scan resolved those already)."""
    # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFileError("not a regular file")
        if info.st_size > MAX_ADAPTER_BYTES:
            raise AdapterFileError(f"{info.st_size} bytes, over the {MAX_ADAPTER_BYTES}-byte limit for an adapter")
        data = handle.read(MAX_ADAPTER_BYTES + 1)
    if len(data) > MAX_ADAPTER_BYTES:
        raise AdapterFileError(f"over the {MAX_ADAPTER_BYTES}-byte limit for an adapter")
    return data


def inspect_adapter(data: bytes) -> tuple[str, str, str, str]:
    """(sha256, description, base_model, A1111 hash) of a safetensors LoRA's bytes, or AdapterFileError."""
    header_bytes = int.from_bytes(data[:8], "little")
    if len(data) < 8 or not 0 < header_bytes <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterFileError("not a readable safetensors file (no header, or one over the size limit)")
    try:
        header = json.loads(data[8 : 8 + header_bytes])
        keys = _tensor_names(header, len(data) - 8 - header_bytes)
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"not a readable safetensors file ({exc})") from None
    if not any("lora" in key.lower() for key in keys):
        raise AdapterFileError("holds no LoRA weights (no key mentions 'lora')")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    description = one_line(str(metadata.get("description", "")), MAX_DESCRIPTION_CHARS)
    base_model = one_line(str(metadata.get("base_model", "")), MAX_BASE_MODEL_CHARS)
    return hashlib.sha256(data).hexdigest(), description, base_model, lora_hash(io.BytesIO(data))
