"""GET /openapi.json describes the service as it is: every route aiohttp serves, every field of the
contract's dataclasses, every error code and the status it comes with."""

from __future__ import annotations

import dataclasses
import inspect

import aiohttp

from generation import contract
from generation.contract import ErrorCode, ImageResult, JobState, JobStatus, ResolvedAdapter
from generation.openapi import SCHEMAS, build_document
from generation.server import STATUS_FOR_CODE, create_app
from loraloop.config import Config, Secrets, ServiceConfig


def document() -> dict:
    return build_document(ServiceConfig(), STATUS_FOR_CODE)


def served_routes() -> set[tuple[str, str]]:
    app = create_app(Config(), Secrets(discord_token=None, service_token=None))
    return {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
            if route.method != "HEAD"}  # aiohttp adds HEAD to every GET


def test_every_route_the_service_serves_is_described_and_no_other():
    described = {(method, path) for path, operations in document()["paths"].items() for method in operations}
    assert described == served_routes()


def test_every_wire_dataclass_is_a_schema_with_its_fields_and_required_fields():
    wire = {cls for _, cls in inspect.getmembers(contract, dataclasses.is_dataclass)
            if cls.__module__ == contract.__name__}
    assert wire == set(SCHEMAS)
    schemas = document()["components"]["schemas"]
    for cls in SCHEMAS:
        schema = schemas[cls.__name__]
        assert set(schema["properties"]) == {f.name for f in dataclasses.fields(cls)}, cls
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        assert set(schema["required"]) == required, cls


def test_what_the_dataclasses_send_fits_their_schemas():
    schemas = document()["components"]["schemas"]
    status = JobStatus(id="j", state=JobState.FAILED, images=(ImageResult(0, 1, 64, 64, "ab"),),
                       adapters=(ResolvedAdapter("pixel", 2, 0.8, "cd"),),
                       error=contract.ApiError("generation_failed", "no"), preview="iVBOR")
    sent = status.to_dict()
    assert set(sent) <= set(schemas["JobStatus"]["properties"])
    assert set(schemas["JobStatus"]["required"]) <= set(sent)
    assert set(sent["error"]) == set(schemas["ApiError"]["properties"])
    assert schemas["JobStatus"]["properties"]["state"]["enum"] == [state.value for state in JobState]


def test_every_error_code_is_documented_with_the_status_it_is_sent_with():
    paths = document()["paths"]
    assert document()["components"]["schemas"]["ApiError"]["properties"]["code"]["enum"] == [c.value for c in ErrorCode]
    documented: dict[str, set[str]] = {}
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if response["description"].startswith("Error codes: "):
                    codes = response["description"].removeprefix("Error codes: ").split(", ")
                    documented.setdefault(status, set()).update(codes)
    for code, status in STATUS_FOR_CODE.items():
        assert code.value in documented.get(str(status), set()), (code, status)
    assert {"400", "408", "413", "415", "429"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert paths["/healthz"]["get"]["security"] == []  # the one route without the token


def test_the_limits_in_the_document_are_the_services_own():
    settings = ServiceConfig(max_steps=40, max_count=2, max_prompt_chars=300)
    request = build_document(settings, STATUS_FOR_CODE)["components"]["schemas"]["JobRequest"]["properties"]
    assert request["steps"]["maximum"] == 40 and request["count"]["maximum"] == 2
    assert request["prompt"]["maxLength"] == 300


async def test_the_service_serves_the_document(service):
    async with aiohttp.ClientSession() as http, http.get(f"{service.url}/openapi.json") as response:
        assert response.status == 200
        served = await response.json()
    assert served == build_document(service.service.settings, STATUS_FOR_CODE)
    assert served["components"]["schemas"]["JobRequest"]["properties"]["steps"]["maximum"] == 80
