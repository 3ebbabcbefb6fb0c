"""Downloading the pictures a `dataset import` source links to, without reaching what it must not.

    policy = HostPolicy.allowing(["192.168.1.0/24"])          # [dataset] allow_private_hosts
    results = await download_all(urls, folder, policy, max_bytes=..., concurrency=8, timeout_s=30)
    # url -> the downloaded file, or a Refused / a short reason it failed

A URL list is input from someone else, so a link may point at this machine (127.0.0.1, the
generation service, a database), at the LAN, or at a cloud's metadata service
(169.254.169.254), directly or through a redirect. Every hop is checked on the address it
actually connects to: host names through `GuardedResolver` (the connector asks it, so the
address checked is the address used), IP literals before the request, and redirects are
followed here, one hop at a time (at most MAX_REDIRECTS), never by aiohttp. Refused:
loopback, private, link-local, multicast, reserved and unspecified addresses, IPv4-mapped IPv6
ones by the address they map, unless a network in the policy allows them.

Every file is capped at `max_bytes` while it streams in (Content-Length can lie or be absent).
Floor: part of training/; imports aiohttp (and its yarl), tqdm and `loraloop`'s version, nothing of
generation/.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from tqdm import tqdm
from yarl import URL

from loraloop import __version__

MAX_REDIRECTS = 5
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# Checked in this order, so an address gets the most telling name (127.0.0.1 is also "private").
_REFUSED_KINDS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refused:
    """A download refused for where it leads; `reason` says which address and how to allow it."""

    reason: str


class RefusedAddress(OSError):
    """Raised by GuardedResolver; aiohttp hands it back inside its connection error."""


@dataclass(frozen=True)
class HostPolicy:
    """Which addresses downloads may connect to: public ones, and the private networks listed."""

    allowed: tuple[Network, ...] = ()

    @classmethod
    def allowing(cls, hosts: Iterable[str]) -> HostPolicy:
        """From [dataset] allow_private_hosts: addresses ("192.168.1.20") or networks ("10.0.0.0/8")."""
        return cls(tuple(ipaddress.ip_network(host, strict=False) for host in hosts))

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the scope is no part of the address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
        if any(ip in network for network in self.allowed):
            return None
        for kind in _REFUSED_KINDS:
            if getattr(ip, f"is_{kind}"):
                article = "an" if kind[0] in "aeiou" else "a"
                return f"{ip} is {article} {kind.replace('_', '-')} address"
        if not ip.is_global:
            return f"{ip} is not a public address"
        return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing host names that resolve to an address the policy refuses."""

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            refusal = self.policy.refusal(result["host"])
            if refusal:
                # One refused address refuses the name: the connector might pick any of them.
                raise RefusedAddress(f"{host}: {refusal}")
        return results

    async def close(self) -> None:
        await self._resolver.close()


def _literal_refusal(url: URL, policy: HostPolicy) -> str | None:
    """The refusal for a URL whose host is an IP address (aiohttp connects to those without resolving)."""
    host = (url.raw_host or "").strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a host name: GuardedResolver checks it
    return policy.refusal(host)


async def _download_one(session: aiohttp.ClientSession, semaphore: asyncio.Semaphore, url: str,
                        destination: Path, policy: HostPolicy, max_bytes: int) -> Path | Refused | str:
    """The downloaded file, a Refused, or a short reason it failed."""
    async with semaphore:
        target = URL(url)
        try:
            for hop in range(MAX_REDIRECTS + 1):
                via = f"redirect to {target}: " if hop else ""
                if target.scheme not in ("http", "https"):
                    return f"{via}not an http(s) URL"
                refusal = _literal_refusal(target, policy)
                if refusal:
                    return Refused(via + refusal)
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                        target = response.url.join(URL(response.headers["Location"]))
                        continue
                    body = await _read_image(response, max_bytes)
                    if isinstance(body, str):
                        return via + body
                    break
            else:
                return f"more than {MAX_REDIRECTS} redirects"
        except TimeoutError:
            return "timed out"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                return Refused(f"{via}{exc.os_error}")
            return f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"
    await asyncio.to_thread(destination.write_bytes, body)
    return destination


async def _read_image(response: aiohttp.ClientResponse, max_bytes: int) -> bytes | str:
    """The body of an image response, or why it is not one."""
    if response.status != 200:
        return f"HTTP {response.status}"
    if not response.content_type.startswith("image/"):
        return f"not an image (Content-Type {response.content_type or 'missing'})"
    if response.content_length is not None and response.content_length > max_bytes:
        return f"too large ({response.content_length} bytes, limit {max_bytes})"
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > max_bytes:
            return f"too large (over the {max_bytes}-byte limit)"
    return bytes(body)


async def download_all(urls: list[str], folder: Path, policy: HostPolicy, *, max_bytes: int, concurrency: int,
                       timeout_s: float, progress: bool = True) -> dict[str, Path | Refused | str]:
    """Fetch each distinct URL once into `folder`; url -> file, Refused, or why it failed."""
    unique = list(dict.fromkeys(urls))
    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    resolver = GuardedResolver(policy)
    connector = aiohttp.TCPConnector(resolver=resolver)
    headers = {"User-Agent": f"loraloop/{__version__}"}
    tasks: dict[asyncio.Future[Any], str] = {}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector) as session:
        tasks = {
            asyncio.ensure_future(_download_one(session, semaphore, url, folder / f"{i:06d}", policy, max_bytes)): url
            for i, url in enumerate(unique)
        }
        with tqdm(total=len(tasks), desc="downloading", unit="file", disable=not progress) as bar:
            for done in asyncio.as_completed(list(tasks)):
                await done
                bar.update()
    await resolver.close()  # a resolver handed to the connector is the caller's to close
    return {url: task.result() for task, url in tasks.items()}
