"""The service's OpenAPI 3.1 document, served at `GET /openapi.json`.

    document = build_document(config.service, STATUS_FOR_CODE)

The routes are listed here by hand (`ROUTES`: what each takes and answers); every schema is
built from the dataclasses of `generation/contract.py`, field by field, and the error codes from
`ErrorCode` and the server's status table, so the shapes cannot drift from the code that
(de)serialises them. The limits that depend on the deployment (max steps, count, prompt length)
come from the service's config. tests/test_openapi.py checks the document against the routes
aiohttp really serves and against the dataclasses; the fuzz test throws requests built from it.

Floor: part of generation/; imports the contract, the request ranges of generation.jobs and the
config, never torch.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from generation import contract
from generation.contract import ErrorCode
from generation.jobs import ADAPTER_WEIGHT_RANGE, GUIDANCE_RANGE, MAX_REQUESTER_CHARS
from loraloop import __version__
from loraloop.config import ServiceConfig

# The dataclasses on the wire, each a schema of the same name.
SCHEMAS = (contract.JobRequest, contract.AdapterRef, contract.JobAccepted, contract.JobStatus,
           contract.ImageResult, contract.ResolvedAdapter, contract.AdapterInfo, contract.Health, contract.WorkerStatus,
           contract.ApiError, contract.DescribeRequest, contract.Description)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    status: int = 200
    body: str | None = None  # the schema of the answer, or a media type ("image/png") for others
    request: str | None = None
    errors: tuple[int, ...] = ()
    open: bool = False  # answers without the bearer token
    array: bool = False  # the answer is a list of `body`


ROUTES = (
    Route("post", "/v1/jobs", "Queue a generation job", 202, "JobAccepted", request="JobRequest",
          errors=(400, 408, 413, 415, 429)),
    Route("get", "/v1/jobs/{id}", "A job's status", body="JobStatus", errors=(404,)),
    Route("get", "/v1/jobs/{id}/events", "Server-sent events, one JobStatus per change, until the job finishes",
          body="text/event-stream", errors=(404,)),
    Route("get", "/v1/jobs/{id}/images/{index}", "A finished image, PNG with an A1111 `parameters` chunk",
          body="image/png", errors=(404,)),
    Route("delete", "/v1/jobs/{id}", "Cancel a job: queued ones are dropped, running ones stop at the next step",
          body="JobStatus", errors=(404,)),
    Route("post", "/v1/describe", "An image's caption from the captioning model, to use as a prompt",
          body="Description", request="DescribeRequest", errors=(400, 408, 413, 415, 429, 503)),
    Route("get", "/v1/adapters", "The adapters this service can apply", body="AdapterInfo", array=True),
    Route("post", "/v1/adapters/reload", "Rescan the adapters directory", body="AdapterInfo", array=True),
    Route("post", "/v1/queue/pause", "Accept jobs but start none", body="Health"),
    Route("post", "/v1/queue/resume", "Start jobs again", body="Health"),
    Route("get", "/healthz", "Liveness, model and queue depth", body="Health", open=True),
    Route("get", "/metrics", "Prometheus text", body="text/plain"),
    Route("get", "/openapi.json", "This document", body="application/json"),
)


def schema_of(hint: Any) -> dict[str, Any]:
    """The JSON schema of one field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_of(arg) for arg in typing.get_args(hint)]}
    if hint is type(None):
        return {"type": "null"}
    if origin in (tuple, list):
        return {"type": "array", "items": schema_of(typing.get_args(hint)[0])}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [member.value for member in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return {"$ref": f"#/components/schemas/{hint.__name__}"}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return {"type": simple[hint]}


def dataclass_schema(cls: type, limits: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """An object schema with one property per field; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    limits = limits or {}
    properties = {f.name: {**schema_of(hints[f.name]), **limits.get(f.name, {})} for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


def request_limits(settings: ServiceConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Per schema and field, the limits this service enforces (the config's, and those of jobs.py)."""
    number = lambda low, high: {"minimum": low, "maximum": high}  # noqa: E731  a table, not logic
    return {
        "JobRequest": {
            "prompt": {"minLength": 1, "maxLength": settings.max_prompt_chars},
            "negative_prompt": {"maxLength": settings.max_prompt_chars},
            "steps": number(1, settings.max_steps),
            "guidance": number(*GUIDANCE_RANGE),
            "seed": number(0, 2**32 - 1),
            "width": {"minimum": 8, "multipleOf": 8},
            "height": {"minimum": 8, "multipleOf": 8},
            "count": number(1, settings.max_count),
            "scheduler": {"description": "one of these, in any case and spacing (A1111's names too)",
                          "examples": list(contract.SCHEDULER_NAMES)},
            "init_image": {"contentEncoding": "base64", "description": "PNG, JPEG or WebP, at most "
                           f"{settings.max_image_pixels} pixels"},
            "strength": number(0.0, 1.0),
            "requester": {"maxLength": MAX_REQUESTER_CHARS},
        },
        "AdapterRef": {
            # The name's rule without Python's \A...\Z anchors, which JSON schema patterns spell ^...$.
            "name": {"pattern": "^" + contract.ADAPTER_NAME_RE.pattern[2:-2] + "(@[0-9]{1,6})?$"},
            "weight": number(*ADAPTER_WEIGHT_RANGE),
        },
        "DescribeRequest": {"image": {"contentEncoding": "base64", "description": "PNG, JPEG or WebP, at most "
                                      f"{settings.max_image_pixels} pixels"}},
        "ApiError": {"code": {"enum": [code.value for code in ErrorCode]}},
    }


def _response(route: Route) -> dict[str, Any]:
    if route.body is None:
        return {"description": route.summary}
    if "/" in route.body:
        return {"description": route.summary, "content": {route.body: {}}}
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{route.body}"}
    if route.array:
        schema = {"type": "array", "items": schema}
    return {"description": route.summary, "content": {"application/json": {"schema": schema}}}


def _operation(route: Route, status_for_code: Mapping[ErrorCode, int]) -> dict[str, Any]:
    responses: dict[str, Any] = {str(route.status): _response(route)}
    # Every route may answer these besides its own: no token, a wrong method, a bug (with a reference).
    statuses = [*route.errors, *(() if route.open else (401,)), 405, 500]
    for status in sorted(set(statuses)):
        codes = [code.value for code, mapped in status_for_code.items() if mapped == status]
        if status == 405:
            codes = [ErrorCode.INVALID_REQUEST.value]
        if status == 500:
            codes = [ErrorCode.INTERNAL.value]
        responses[str(status)] = {
            "description": "Error codes: " + ", ".join(codes),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
    operation: dict[str, Any] = {"summary": route.summary, "responses": responses}
    if route.open:
        operation["security"] = []
    if route.request:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.request}"}}},
        }
    parameters = [name.strip("{}") for name in route.path.split("/") if name.startswith("{")]
    if parameters:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[0-9]+$"} if name == "index" else {"type": "string"}}
            for name in parameters
        ]
    return operation


def build_document(settings: ServiceConfig, status_for_code: Mapping[ErrorCode, int]) -> dict[str, Any]:
    """The whole OpenAPI document for a service with these settings."""
    limits = request_limits(settings)
    schemas = {cls.__name__: dataclass_schema(cls, limits.get(cls.__name__, {})) for cls in SCHEMAS}
    schemas["ErrorBody"] = {"type": "object", "required": ["error"],
                            "properties": {"error": {"$ref": "#/components/schemas/ApiError"}}}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, status_for_code)
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraloop generation service", "version": __version__,
                 "description": "Stable Diffusion with LoRA adapters behind a fair queue. Errors are always "
                                "{\"error\": {\"code\", \"message\"}}, the message one sentence a person can act on."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "LORALOOP_SERVICE_TOKEN, when the service has one"}},
        },
        "security": [{"bearer": []}],
    }
