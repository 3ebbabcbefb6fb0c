"""Settings: `config.toml` loaded into frozen dataclasses, one section per package.

Every key has a default, so a missing file or section is fine; an unknown key, a value of the
wrong type or one out of range stops the program at start with the file, the key and the
reason. Secrets never live in the file: they come from the environment (see `Secrets`).

Each package owns its section's dataclass here; a section validates its own ranges in
`__post_init__` by raising `ValueError` with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project needs 3.11, kept for people who backport
    import tomli as tomllib

CONFIG_ENV = "LORALOOP_CONFIG"
DATA_DIR_ENV = "LORALOOP_DATA_DIR"


class ConfigError(Exception):
    """A configuration problem a person can fix; the message says where and how."""


def _require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {reason}")


@dataclass(frozen=True)
class PathsConfig:
    # Everything loraloop writes lives here: the database, images, adapters, models, datasets
    # and training runs. Relative paths are relative to the config file. LORALOOP_DATA_DIR wins.
    data_dir: str = "data"


@dataclass(frozen=True)
class ServiceConfig:
    # Loopback by default: the service has no auth unless LORALOOP_SERVICE_TOKEN is set, so
    # exposing it on 0.0.0.0 without a token lets anyone on the network use the GPU.
    host: str = "127.0.0.1"
    port: int = 8765
    # A diffusers model id, a local diffusers directory, a single-file .safetensors checkpoint,
    # or "tiny" (random weights, offline, seconds to build: for trying things out and tests).
    model: str = "tiny"
    # "auto" takes CUDA when present (fp16), else the CPU (fp32).
    device: str = "auto"
    # Directory of LoRA adapters (NAME/vN.safetensors or NAME.safetensors). Empty: DATA_DIR/adapters.
    adapters_dir: str = ""

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "port", "must be between 1 and 65535")
        _require(self.model.strip() != "", "model", "must name a model id, a path or 'tiny'")
        _require(self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:"),
                 "device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class StoreConfig:
    # SQLite database file. Empty: DATA_DIR/loraloop.db.
    database: str = ""


@dataclass(frozen=True)
class BotConfig:
    # Where the bot finds the generation service.
    service_url: str = "http://127.0.0.1:8765"


@dataclass(frozen=True)
class TrainingConfig:
    # Training resolution; imported images are resized and centre-cropped to it.
    resolution: int = 512

    def __post_init__(self) -> None:
        _require(self.resolution >= 8 and self.resolution % 8 == 0, "resolution",
                 "must be a positive multiple of 8")


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # The file this was read from (None: defaults only); relative paths resolve against it.
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        env = os.environ.get(DATA_DIR_ENV)
        if env:
            return Path(env).expanduser().resolve()
        return self.resolve_path(self.paths.data_dir)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            base = self.source.parent if self.source is not None else Path.cwd()
            path = base / path
        return path.resolve()

    @property
    def database_path(self) -> Path:
        if self.store.database:
            return self.resolve_path(self.store.database)
        return self.data_dir / "loraloop.db"

    @property
    def adapters_dir(self) -> Path:
        if self.service.adapters_dir:
            return self.resolve_path(self.service.adapters_dir)
        return self.data_dir / "adapters"

    def replace(self, section: str, **changes: typing.Any) -> "Config":
        """A copy with some keys of one section changed (CLI flags override the file this way)."""
        try:
            new_section = dataclasses.replace(getattr(self, section), **changes)
        except ValueError as exc:
            raise ConfigError(f"[{section}] {exc}") from None
        return dataclasses.replace(self, **{section: new_section})


@dataclass(frozen=True)
class Secrets:
    """Secrets from the environment only, so config.toml can be committed and shared."""

    discord_token: str | None
    service_token: str | None

    @classmethod
    def from_env(cls) -> "Secrets":
        return cls(
            discord_token=os.environ.get("DISCORD_TOKEN") or None,
            service_token=os.environ.get("LORALOOP_SERVICE_TOKEN") or None,
        )


def _type_name(tp: typing.Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(value: typing.Any, tp: typing.Any) -> bool:
    """Whether a TOML value fits a dataclass field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(_check_type(v, value_tp) for v in value.values())
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is typing.Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build_section(cls: type, table: typing.Any, where: str) -> typing.Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' (known keys: {', '.join(sorted(known))})"
            )
        tp = hints[key]
        if not _check_type(value, tp):
            shown = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else _type_name(tp)
            raise ConfigError(f"{where}.{key}: expected {shown}, got {value!r}")
        if tp is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None


def parse_config(data: dict[str, typing.Any], source: Path | None = None) -> Config:
    """Build a Config from parsed TOML, failing on unknown sections, keys and bad values."""
    label = str(source) if source is not None else "config"
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(
                f"{label}: unknown section [{name}] (known sections: {', '.join(sections)})"
            )
        built[name] = _build_section(hints[name], table, f"{label}: [{name}]")
    return Config(**built, source=source)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load settings from `path`, else $LORALOOP_CONFIG, else ./config.toml, else defaults."""
    explicit = path is not None or os.environ.get(CONFIG_ENV)
    candidate = Path(path or os.environ.get(CONFIG_ENV) or "config.toml").expanduser()
    if not candidate.exists():
        if explicit:
            raise ConfigError(f"{candidate}: config file not found")
        return Config()
    try:
        data = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{candidate}: cannot read: {exc.strerror}") from None
    return parse_config(data, source=candidate.resolve())
