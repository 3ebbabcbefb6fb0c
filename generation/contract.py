"""The wire format between the generation service and its clients (the bot, `loraloop imagine`).

Plain frozen dataclasses with `to_dict()` / `from_dict()`, standard library only, so the bot can
import this without torch. `from_dict` is where bad input is caught: it raises `InvalidRequest`
with a sentence a person can act on, and the service turns that into a 400.

Limits that depend on the deployment (max steps, max pixels, known adapters and schedulers) are
checked by the service against its config; the checks here are the ones true everywhere.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

# Adapter names travel in URLs and become file names: letters, digits, '-', '_' and '.', never
# starting with '.', so no name can climb out of the adapters directory. \A and \Z, not ^ and $:
# `$` also matches before a final newline, which would let "pixel\n" through.
ADAPTER_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ADAPTER_VERSION_RE = re.compile(r"\A[0-9]{1,6}\Z")
# No field takes a whole number past this; refusing it here keeps giant integers (JSON has no
# limit) out of the arithmetic and float formatting of the checks after parsing.
MAX_WHOLE_NUMBER = 2**53



class Sampler(NamedTuple):
    """A scheduler the service runs (generation/pipeline.py builds it) and how AUTOMATIC1111 names it.

    A1111 1.9 and later split a sampler from its schedule type and read a PNG that names no
    schedule as "Automatic", the sampler's own default (Karras for DPM++ 2M), so a PNG must say
    both to render the same there. The schedules are diffusers' documented equivalents of A1111's:
    "trailing" timesteps for "SGM Uniform", Karras sigmas for "Karras", and "linspace" timesteps
    (t from 999 to 0, evenly) for k-diffusion's "Uniform". A1111 takes no schedule type for DDIM
    and LCM.
    """

    # A table row, not a wire shape (the dataclasses of this module are the wire format).
    name: str  # ours, in the API and config: "dpmpp_2m"
    a1111_sampler: str  # "DPM++ 2M"
    a1111_schedule: str = ""  # "SGM Uniform"; empty where A1111 has none


SAMPLERS = (
    Sampler("dpmpp_2m", "DPM++ 2M", "SGM Uniform"),
    Sampler("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
    Sampler("euler_a", "Euler a", "Uniform"),
    Sampler("ddim", "DDIM"),
    Sampler("lcm", "LCM"),
)
SCHEDULERS = tuple(sampler.name for sampler in SAMPLERS)
DEFAULT_SCHEDULER = "dpmpp_2m"
# The schedule A1111 gives a sampler named alone (its "Automatic"): "DPM++ 2M" means Karras there.
_A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "Euler a": "Uniform"}
_BY_NAME = {
    **{sampler.name: sampler for sampler in SAMPLERS},
    **{f"{s.a1111_sampler} {s.a1111_schedule}".strip().lower(): s for s in SAMPLERS},
    **{s.a1111_sampler.lower(): s for s in SAMPLERS if s.a1111_schedule == _A1111_AUTOMATIC.get(s.a1111_sampler, "")},
}


# Every spelling a request may use (sampler_named ignores case and spacing): ours, then A1111's.
SCHEDULER_NAMES = tuple(dict.fromkeys([
    *SCHEDULERS, *(f"{s.a1111_sampler} {s.a1111_schedule}".strip() for s in SAMPLERS), *_A1111_AUTOMATIC,
]))


def sampler_named(name: str) -> Sampler | None:
    """The sampler a name means: ours ("dpmpp_2m_karras") or A1111's, as its API and PNGs write it
    ("DPM++ 2M Karras", "Euler a"; "DPM++ 2M" alone is Karras, as A1111 reads it); None if unknown."""
    return _BY_NAME.get(" ".join(name.split()).lower())


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_ADAPTER = "unknown_adapter"
    UNKNOWN_SCHEDULER = "unknown_scheduler"
    INVALID_IMAGE = "invalid_image"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    REQUEST_TIMEOUT = "request_timeout"
    QUEUE_FULL = "queue_full"
    REQUESTER_LIMIT = "requester_limit"
    GENERATION_FAILED = "generation_failed"
    CAPTIONER_UNAVAILABLE = "captioner_unavailable"
    INTERNAL = "internal"


class InvalidRequest(ValueError):
    """Bad input from a client. `message` is shown to a person as is."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ApiError:
    """The body of every error response: `{"error": {"code": ..., "message": ...}}`."""

    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiError:
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            return cls(code=ErrorCode.INTERNAL.value, message="The service sent an unreadable error.")
        return cls(code=str(error.get("code", "internal")), message=str(error.get("message", "")))


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """Read an optional field, rejecting the wrong JSON type with a message naming it."""
    if name not in data or data[name] is None:
        return default
    value = data[name]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WHOLE_NUMBER:
        raise InvalidRequest(f"'{name}' is far out of range.")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"'{name}' must be a {_kind_name(kind)}, not true/false.")
    if not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' must be a {_kind_name(kind)}.")
    if isinstance(value, str) and not _is_unicode(value):
        raise InvalidRequest(f"'{name}' is not valid Unicode text (it holds a lone surrogate such as \\ud800).")
    return value


def _is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate: JSON can escape one, UTF-8 cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "whole number", float: "number", str: "string", list: "list", bool: "boolean"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA adapter applied to a request. `name` may pin a version: "pixel@3"."""

    name: str
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight}

    @classmethod
    def from_dict(cls, data: Any) -> AdapterRef:
        if not isinstance(data, dict):
            raise InvalidRequest('Each adapter must be an object like {"name": "pixel", "weight": 0.8}.')
        name = _field(data, "name", str, "")
        base, _, version = name.partition("@")
        if not ADAPTER_NAME_RE.match(base) or (version and not ADAPTER_VERSION_RE.match(version)):
            raise InvalidRequest(
                f"Adapter name {name!r} is not valid: use letters, digits, '-', '_' or '.', "
                "optionally followed by @VERSION.",
                ErrorCode.UNKNOWN_ADAPTER,
            )
        weight = _field(data, "weight", float, 1.0)
        return cls(name=name, weight=weight)


@dataclass(frozen=True)
class JobRequest:
    """What `POST /v1/jobs` accepts. Optional fields left as None take the service's defaults."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[AdapterRef, ...] = ()
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    count: int = 1
    scheduler: str | None = None
    # Base64 of an image file for img2img; `strength` says how far from it to go (0..1).
    init_image: str | None = None
    strength: float | None = None
    # Who asked (for the fair queue): for example "discord:1234". Empty: anonymous.
    requester: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapters"] = [a.to_dict() for a in self.adapters]
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> JobRequest:
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(
                f"Unknown field(s): {', '.join(unknown)}. Known fields: {', '.join(sorted(known))}."
            )
        prompt = _field(data, "prompt", str, "")
        if not prompt.strip():
            raise InvalidRequest("'prompt' is required: describe the image you want.")
        adapters_raw = _field(data, "adapters", list, [])
        adapters = tuple(AdapterRef.from_dict(a) for a in adapters_raw)
        seed = _field(data, "seed", int, None)
        if seed is not None and not 0 <= seed < 2**32:
            raise InvalidRequest("'seed' must be between 0 and 4294967295.")
        return cls(
            prompt=prompt,
            negative_prompt=_field(data, "negative_prompt", str, ""),
            adapters=adapters,
            steps=_field(data, "steps", int, None),
            guidance=_field(data, "guidance", float, None),
            seed=seed,
            width=_field(data, "width", int, None),
            height=_field(data, "height", int, None),
            count=_field(data, "count", int, 1),
            scheduler=_field(data, "scheduler", str, None),
            init_image=_field(data, "init_image", str, None),
            strength=_field(data, "strength", float, None),
            requester=_field(data, "requester", str, ""),
        )


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobAccepted:
    """The 202 answer to `POST /v1/jobs`."""

    id: str
    position: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobAccepted:
        return cls(id=str(data["id"]), position=int(data["position"]))


@dataclass(frozen=True)
class ImageResult:
    """One finished image of a job: fetch it at `GET /v1/jobs/{id}/images/{index}`."""

    index: int
    seed: int
    width: int
    height: int
    sha256: str
    # The safety check's verdict: True flagged, False passed, None when the service runs no check.
    nsfw: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageResult:
        nsfw = data.get("nsfw")
        return cls(
            index=int(data["index"]),
            seed=int(data["seed"]),
            width=int(data["width"]),
            height=int(data["height"]),
            sha256=str(data["sha256"]),
            nsfw=None if nsfw is None else bool(nsfw),
        )


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter as the service actually applied it (the version resolved, for provenance)."""

    name: str
    version: int | None
    weight: float
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedAdapter:
        version = data.get("version")
        return cls(
            name=str(data["name"]),
            version=None if version is None else int(version),
            weight=float(data["weight"]),
            sha256=str(data.get("sha256", "")),
        )


@dataclass(frozen=True)
class JobStatus:
    """`GET /v1/jobs/{id}`, and each server-sent event of `GET /v1/jobs/{id}/events`.

    `preview` (base64 PNG, small) appears only in events, every few steps when enabled.
    `parameters` are the request after defaults were applied, so a client can show and store
    exactly what ran (steps, guidance, scheduler, size, seeds).
    """

    id: str
    state: JobState
    position: int = 0
    step: int = 0
    total_steps: int = 0
    images: tuple[ImageResult, ...] = ()
    adapters: tuple[ResolvedAdapter, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    error: ApiError | None = None
    preview: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "position": self.position,
            "step": self.step,
            "total_steps": self.total_steps,
            "images": [i.to_dict() for i in self.images],
            "adapters": [a.to_dict() for a in self.adapters],
            "parameters": dict(self.parameters),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.error is not None:
            data["error"] = self.error.to_dict()["error"]
        if self.preview is not None:
            data["preview"] = self.preview
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobStatus:
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            state=JobState(data["state"]),
            position=int(data.get("position", 0)),
            step=int(data.get("step", 0)),
            total_steps=int(data.get("total_steps", 0)),
            images=tuple(ImageResult.from_dict(i) for i in data.get("images", [])),
            adapters=tuple(ResolvedAdapter.from_dict(a) for a in data.get("adapters", [])),
            parameters=dict(data.get("parameters") or {}),
            error=ApiError.from_dict({"error": error}) if error else None,
            preview=data.get("preview"),
            created_at=float(data.get("created_at") or 0.0),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
        )


@dataclass(frozen=True)
class AdapterInfo:
    """One entry of `GET /v1/adapters`: a loadable adapter version."""

    name: str
    version: int | None
    sha256: str
    description: str = ""
    base_model: str = ""
    latest: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterInfo:
        version = data.get("version")
        return cls(
            name=str(data["name"]),
            version=None if version is None else int(version),
            sha256=str(data.get("sha256", "")),
            description=str(data.get("description", "")),
            base_model=str(data.get("base_model", "")),
            latest=bool(data.get("latest", True)),
        )


@dataclass(frozen=True)
class DescribeRequest:
    """What `POST /v1/describe` accepts: an image to turn into a prompt."""

    # Base64 of a PNG, JPEG or WebP file.
    image: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DescribeRequest:
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise InvalidRequest(f"Unknown field(s): {', '.join(unknown)}. Known fields: image.")
        image = _field(data, "image", str, "")
        if not image:
            raise InvalidRequest("'image' is required: the base64 of a PNG, JPEG or WebP file.")
        return cls(image=image)


@dataclass(frozen=True)
class Description:
    """The answer to `POST /v1/describe`: the captioning model's words for the image."""

    caption: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Description:
        return cls(caption=str(data["caption"]))


@dataclass(frozen=True)
class WorkerStatus:
    """One GPU worker of the service: the local thread, or a Ray worker actor."""

    name: str
    alive: bool  # False while a Ray worker restarts (until its model has loaded) or after it is gone
    busy: bool
    adapters: tuple[str, ...]  # adapter versions it holds loaded ("fox@2"), as of its last batch
    batches: int  # batches it has finished

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "adapters": list(self.adapters)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStatus:
        return cls(name=str(data["name"]), alive=bool(data["alive"]), busy=bool(data["busy"]),
                   adapters=tuple(str(a) for a in data.get("adapters", ())), batches=int(data["batches"]))


@dataclass(frozen=True)
class Health:
    """`GET /healthz`."""

    status: str
    model: str
    device: str
    queue_depth: int
    paused: bool = False
    # The model's native image side (what a request without width/height gets); 0 while loading.
    native_size: int = 0
    backend: str = "local"
    workers: tuple[WorkerStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "workers": [worker.to_dict() for worker in self.workers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Health:
        return cls(
            status=str(data["status"]),
            model=str(data["model"]),
            device=str(data["device"]),
            queue_depth=int(data["queue_depth"]),
            paused=bool(data.get("paused", False)),
            native_size=int(data.get("native_size", 0)),
            backend=str(data.get("backend", "local")),
            workers=tuple(WorkerStatus.from_dict(w) for w in data.get("workers", ())),
        )


# The shapes a person may ask for, by name (Discord's /imagine and the web console offer the same).
ASPECTS = {"1:1": (1, 1), "2:3": (2, 3), "3:2": (3, 2), "16:9": (16, 9), "9:16": (9, 16)}


def size_for(aspect: str, base: int) -> tuple[int, int]:
    """Width and height for an aspect: the short side is `base`, the long one a multiple of 8."""
    w, h = ASPECTS[aspect]
    long_side = round(base * max(w, h) / min(w, h) / 8) * 8
    return (base, base) if w == h else (long_side, base) if w > h else (base, long_side)
