"""The LoRA adapter directory: what is there, which versions, and which files are safe to load.

Layout (the training `publish` command writes the first form):

    ADAPTERS_DIR/pixel/v1.safetensors   versioned: "pixel" is the highest vN, "pixel@1" pins one
    ADAPTERS_DIR/ink.safetensors        unversioned

Only safetensors are read. Pickle files (.bin, .ckpt, .pt, .pth, .pkl) are refused, because
unpickling one can run any code its author chose. A file that does not open as safetensors or
holds no LoRA weights is skipped with a logged error, and the others keep serving.

Scanning hashes files, so it is blocking: the server runs `scan()` on an executor thread. The
result is an immutable `AdapterCatalog` swapped in whole, so readers never see half a scan.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from generation.contract import ADAPTER_NAME_RE, AdapterInfo, AdapterRef, ErrorCode, InvalidRequest
from loraloop.hashes import lora_hash

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
VERSION_FILE_RE = re.compile(r"^v([0-9]{1,6})\.safetensors$")


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
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not ADAPTER_NAME_RE.match(entry.name):
                    log.warning("adapters: skipping %s: not a valid adapter name", entry)
                    continue
                for file in sorted(entry.iterdir()):
                    if _refused(file):
                        continue
                    match = VERSION_FILE_RE.match(file.name)
                    if not match:
                        if file.is_file():
                            log.warning("adapters: skipping %s: expected files named vN.safetensors", file)
                        continue
                    self._add(found, entry.name, int(match.group(1)), file)
            elif entry.suffix == ".safetensors":
                if not ADAPTER_NAME_RE.match(entry.stem):
                    log.warning("adapters: skipping %s: not a valid adapter name", entry)
                    continue
                self._add(found, entry.stem, None, entry)
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
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._seen:
                self._seen[key] = _inspect(path)
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


def _inspect(path: Path) -> tuple[str, str, str, str]:
    """(sha256, description, base_model, A1111 hash) of a safetensors LoRA, or AdapterFileError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            # Reading every tensor catches a file cut short after a valid header.
            for key in keys:
                handle.get_tensor(key)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"not a readable safetensors file ({exc})") from None
    if not any("lora" in key.lower() for key in keys):
        raise AdapterFileError("holds no LoRA weights (no key mentions 'lora')")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), metadata.get("description", ""), metadata.get("base_model", ""), lora_hash(path)
