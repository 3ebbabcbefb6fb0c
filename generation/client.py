"""An async client of the generation service, for the bot, `loraloop imagine` and `publish`.

    client = ServiceClient("http://127.0.0.1:8765", token=os.environ.get("LORALOOP_SERVICE_TOKEN"))
    accepted = await client.submit(JobRequest(prompt="a red fox", seed=42))
    async for status in client.events(accepted.id):     # ends when the job finishes
        print(status.state.value, status.step, status.total_steps)
    png = await client.image(accepted.id, 0)
    await client.close()

Every failure is a `ServiceError(code, message, http_status)`: the service's own JSON errors
keep their code and message; an unreachable service is code "unavailable". No torch here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from generation.contract import (
    AdapterInfo,
    ApiError,
    DescribeRequest,
    Description,
    Health,
    JobAccepted,
    JobRequest,
    JobStatus,
)

UNAVAILABLE = "unavailable"


class ServiceError(Exception):
    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status

    def __str__(self) -> str:
        return self.message


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the API ---------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobAccepted:
        return JobAccepted.from_dict(await self._json("POST", "/v1/jobs", json=request.to_dict()))

    async def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(await self._json("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_dict(await self._json("DELETE", f"/v1/jobs/{job_id}"))

    async def image(self, job_id: str, index: int) -> bytes:
        async with self._request("GET", f"/v1/jobs/{job_id}/images/{index}") as response:
            await _raise_for_error(response)
            return await response.read()

    async def events(self, job_id: str) -> AsyncIterator[JobStatus]:
        """Each status the service streams for the job, the last one finished (done/failed/cancelled)."""
        # No total timeout: a queued job may wait minutes; the stream itself is the keep-alive.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.total)
        async with self._request("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
            await _raise_for_error(response)
            data_lines: list[str] = []
            try:
                async for raw in response.content:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("data:"):
                        data_lines.append(line[5:].lstrip())
                    elif not line and data_lines:
                        status = JobStatus.from_dict(json.loads("\n".join(data_lines)))
                        data_lines = []
                        yield status
                        if status.state.finished:
                            return
            except aiohttp.ClientError as exc:
                raise ServiceError(UNAVAILABLE, f"Lost the event stream of job {job_id}: {exc}") from exc
        raise ServiceError(UNAVAILABLE, f"The event stream of job {job_id} ended before the job finished.")

    async def describe(self, image: bytes) -> Description:
        """A caption for an image file's bytes (PNG, JPEG or WebP), from the service's captioner."""
        body = DescribeRequest(base64.b64encode(image).decode("ascii")).to_dict()
        return Description.from_dict(await self._json("POST", "/v1/describe", json=body))

    async def adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo.from_dict(a) for a in await self._json("GET", "/v1/adapters")]

    async def reload_adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo.from_dict(a) for a in await self._json("POST", "/v1/adapters/reload")]

    async def health(self) -> Health:
        return Health.from_dict(await self._json("GET", "/healthz"))

    async def pause(self) -> Health:
        return Health.from_dict(await self._json("POST", "/v1/queue/pause"))

    async def resume(self) -> Health:
        return Health.from_dict(await self._json("POST", "/v1/queue/resume"))

    # -- plumbing --------------------------------------------------------------------------

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _request(self, method: str, path: str, **kwargs: Any) -> _Request:
        return _Request(self, method, path, kwargs)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._request(method, path, **kwargs) as response:
            await _raise_for_error(response)
            try:
                return await response.json()
            except (aiohttp.ContentTypeError, json.JSONDecodeError) as exc:
                raise ServiceError("internal", f"The service sent a non-JSON answer to {method} {path}.",
                                   response.status) from exc


class _Request:
    """`async with` around one request that turns connection failures into ServiceError."""

    def __init__(self, client: ServiceClient, method: str, path: str, kwargs: dict[str, Any]) -> None:
        self.client, self.method, self.path, self.kwargs = client, method, path, kwargs
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        url = self.client.base_url + self.path
        headers = {**self.client._headers, **self.kwargs.pop("headers", {})}
        try:
            self.response = await self.client._session_or_new().request(
                self.method, url, headers=headers, **self.kwargs
            )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServiceError(
                UNAVAILABLE,
                f"The generation service at {self.client.base_url} can't be reached ({exc.__class__.__name__}). "
                "Is `loraloop serve` running?",
            ) from exc
        return self.response

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.response is not None:
            self.response.release()


async def _raise_for_error(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    try:
        error = ApiError.from_dict(await response.json(content_type=None))
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError):
        error = ApiError("internal", f"The service answered HTTP {response.status} without a readable error.")
    raise ServiceError(error.code, error.message, response.status)
