"""Generated requests against a real service on the tiny model: no 5xx, no error in its log, no
server path in any answer, and a normal job still succeeds afterwards.

Each request is built from the OpenAPI document the service serves (its routes, JobRequest's
fields and limits) and hostile shapes around them: a valid job with a field or two replaced by
a value of the wrong type or out of range, giant and non-finite numbers, lone surrogates,
control characters, deep nesting, broken JSON, other methods and content types, unknown job ids
and image indexes. Hypothesis drives it: it draws a seed per request and `generated_request`
turns the seed into the request with its own random generator (Hypothesis's own strategies
start small and stay near the simplest values for a run this short; a seeded walk over the
document reaches the hostile corners in a few hundred requests). Derandomised, with a fixed
number of examples, so CI sends the same requests every time, in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import logging
import random
import time
import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from generation.client import ServiceClient
from generation.contract import JobRequest, JobState

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# Values known to have broken a parser or a check somewhere: each gets its turn.
HOSTILE_VALUES = [None, True, False, 0, -1, 2**31, 2**53 + 1, 10**400, -(10**400), 1e308, -0.0, 0.1, "", " ",
                  "\ud800", "x\udfff", "fox\nSteps: 999", "\x1b[2J", "a" * 1001, "r" * 201, [], {}, [[[]]], [None],
                  [{"name": "style\n"}], [{"name": "../x"}], [{"name": "style", "weight": 10**400}],
                  [{"name": "style@²"}], [{"name": "style"}, {"name": "style@1"}], "NaN", "dpmpp_2m\n", "AAAA",
                  "iVBORw0KGgo=", small_png()[:40], small_png()]
RAW_BODIES = [b"", b"{", b"[]", b"null", b'{"prompt": NaN}', b'{"prompt": "x", "guidance": -Infinity}',
              b'{"prompt": "x", "seed": 1e999}', b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}",
              b"[" * 5000 + b"]" * 5000, b'{"prompt": "x", "adapters": ' + b"[" * 5000 + b"]" * 5000 + b"}",
              b'{"prompt": "\\ud800"}', "{\"prompt\": \"caf\u00e9\"}".encode("latin-1"), b"\xff\xfe{\x00"]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
JSON_TYPES = ["application/json", "application/json; charset=utf-8"]
OTHER_TYPES = ["text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]
AUTHORIZATIONS = [None, None, "Bearer nope", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 500, "Bearer"]
IDS = ["nope", "", "../healthz", "\u00e9\u00e9", "0" * 300, "\ud800", "%00"]
INDEXES = ["0", "1", "²", "٣", "-1", "99999999999999999999", "0x0", "%2e", " 0", "\ud800"]


def text(rnd: random.Random, size: int) -> str:
    """Printable ASCII, accents, CJK, emoji, controls: no surrogates (HOSTILE_VALUES brings those)."""
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x00, 0x1F)]
    return "".join(chr(rnd.randint(*rnd.choice(pools))) for _ in range(size))


def any_json(rnd: random.Random, depth: int = 0) -> object:
    if rnd.random() < 0.4:
        return rnd.choice(HOSTILE_VALUES)
    kind = rnd.randrange(1, 7 if depth < 3 else 5)
    if kind == 1:
        # Up to 1400 bits: past a double's range, where int-to-float conversions overflow.
        return rnd.choice([-1, 1]) * rnd.getrandbits(rnd.choice([4, 16, 64, 200, 1400]))
    if kind == 2:
        return rnd.uniform(-1e6, 1e6) * 10 ** rnd.randint(-300, 300)
    if kind == 3:
        return text(rnd, rnd.randint(0, 40))
    if kind == 4:
        return rnd.choice([None, True, False])
    if kind == 5:
        return [any_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return {text(rnd, rnd.randint(0, 8)): any_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))}


def kind(schema: dict) -> str | None:
    """The JSON type of a field; for an optional one (anyOf [T, null]), T's."""
    types = [branch.get("type") for branch in schema.get("anyOf", [schema])]
    return next((t for t in types if t != "null"), None)


def valid_value(rnd: random.Random, name: str, schema: dict) -> object:
    """A value for one JobRequest field within the document's limits (kept cheap: tiny sizes, few steps)."""
    if "enum" in schema:
        return rnd.choice(schema["enum"])
    if schema.get("multipleOf"):
        return rnd.choice([8, 16, 64])
    if kind(schema) == "integer":
        return rnd.randint(schema.get("minimum", 0), min(schema.get("maximum", 64), 64))
    if kind(schema) == "number":
        return rnd.uniform(schema.get("minimum", 0.0), schema.get("maximum", 10.0))
    if name == "init_image":
        return small_png()
    if name == "adapters":
        return [{"name": rnd.choice(["style", "style@1"]), "weight": rnd.uniform(-2, 2)}][: rnd.randint(0, 1)]
    return text(rnd, rnd.randint(1, 30)).strip() or "x"


def job_body(document: dict, rnd: random.Random) -> bytes:
    """A valid job with a field or two made hostile (so every check after the first still runs),
    sometimes valid as it is, sometimes bytes the parser has to survive."""
    if rnd.random() < 0.15:
        return rnd.choice(RAW_BODIES) if rnd.random() < 0.7 else rnd.randbytes(rnd.randint(0, 200))
    properties = document["components"]["schemas"]["JobRequest"]["properties"]
    body = {"prompt": valid_value(rnd, "prompt", properties["prompt"])}
    for name, schema in properties.items():
        if name != "prompt" and rnd.random() < 0.3:
            body[name] = valid_value(rnd, name, schema)
    numeric = [name for name, schema in properties.items() if kind(schema) in ("integer", "number")]
    for _ in range(rnd.choice([0, 1, 1, 1, 2])):
        # Half the time a number: their range checks are where a giant or odd value goes furthest.
        body[rnd.choice(numeric if rnd.random() < 0.5 else [*properties, "stpes"])] = any_json(rnd)
    return json.dumps(body).encode()


def generated_request(document: dict, job_id: str, seed: int) -> dict:
    """One request, a pure function of `seed`: most of the work goes where input is parsed, POST /v1/jobs."""
    rnd = random.Random(seed)
    if rnd.random() < 0.7:
        method, path, content_type = "POST", "/v1/jobs", rnd.choice(JSON_TYPES)
    else:
        method, content_type = rnd.choice(METHODS), rnd.choice(JSON_TYPES + OTHER_TYPES)
        template = rnd.choice([*document["paths"], "/v2/anything", "/", "/v1/jobs/{id}/images/{index}/extra"])

        def quoted(value: str) -> str:
            return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")

        some_id = job_id if rnd.random() < 0.5 else rnd.choice(IDS)
        index = rnd.choice(INDEXES) if rnd.random() < 0.7 else text(rnd, rnd.randint(0, 5))
        path = template.replace("{id}", quoted(some_id)).replace("{index}", quoted(index)) or "/"
    return {"method": method, "path": path, "content_type": content_type,
            "authorization": rnd.choice(AUTHORIZATIONS), "body": job_body(document, rnd)}


def send(base_url: str, request: dict) -> tuple[int, bytes, str]:
    """One request with http.client (no client-side checks); (status, body, content type)."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    headers = {"Content-Type": request["content_type"]}
    if request["authorization"]:
        headers["Authorization"] = request["authorization"]
    try:
        body = request["body"] if request["method"] in ("POST", "PUT", "PATCH") else None
        connection.request(request["method"], request["path"], body=body, headers=headers)
        response = connection.getresponse()
        content_type = response.getheader("Content-Type", "")
        # An event stream runs until its job ends; its status and headers are what is checked here.
        data = b"" if content_type.startswith("text/event-stream") else response.read()
        return response.status, data, content_type
    finally:
        connection.close()


async def last_status(client: ServiceClient, job_id: str):
    return [status async for status in client.events(job_id)][-1]


async def test_generated_requests_never_get_a_5xx_and_the_service_keeps_serving(make_service, caplog, tiny_model_dir):
    from generation.testing import write_lora

    caplog.set_level(logging.WARNING)
    running = await make_service(max_steps=2, default_steps=1, max_count=2, max_pixels=64 * 64, max_queue=32,
                                 max_per_requester=32, preview_every=0, max_body_bytes=1 << 20, read_timeout_s=5)
    write_lora(tiny_model_dir, running.adapters_dir / "style" / "v1.safetensors")
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        first = await client.submit(JobRequest(prompt="a job to poke at", steps=1))
        document = json.loads((await asyncio.to_thread(send, running.url, {
            "method": "GET", "path": "/openapi.json", "content_type": "application/json", "authorization": None,
            "body": b""}))[1])
        answers: list[tuple[str, str, int]] = []

        @FUZZ
        @given(st.integers(min_value=0, max_value=2**64 - 1))
        def poke(seed: int) -> None:
            request = generated_request(document, first.id, seed)
            status, body, content_type = send(running.url, request)
            answers.append((request["method"], request["path"], status))
            assert status < 500, (request, status, body[:300])
            if status >= 400 and request["method"] != "HEAD":
                assert content_type.startswith("application/json"), (request, content_type)
                error = json.loads(body)["error"]
                assert error["code"] and error["message"], (request, error)
                assert str(running.adapters_dir.parent) not in error["message"], (request, error)

        started = time.perf_counter()
        await asyncio.to_thread(poke)
        seconds = time.perf_counter() - started

        await client.resume()  # the fuzz may have paused the queue (POST /v1/queue/pause is in the document)
        for _ in range(200):  # and filled it: let the worker drain what it accepted
            if (await client.health()).queue_depth == 0:
                break
            await asyncio.sleep(0.1)
        after = await client.submit(JobRequest(prompt="a normal job after the storm", steps=1))
        final = await asyncio.wait_for(last_status(client, after.id), timeout=60)
        assert final.state is JobState.DONE, final.error
    assert len(answers) >= EXAMPLES and {status for *_, status in answers} & {202, 400, 404, 405, 415}
    assert seconds < 60, f"the fuzz run took {seconds:.0f} s; CI allows it a minute"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(r.getMessage() for r in errors)
