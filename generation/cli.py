"""`loraloop serve` and `loraloop imagine`.

    loraloop serve --model tiny --port 8765
    loraloop imagine "a red fox in the snow" --seed 42 --adapter pixel:0.8 -o fox.png
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from pathlib import Path

import click

from generation.contract import SCHEDULERS, AdapterRef, InvalidRequest, JobRequest
from loraloop.config import SERVICE_TOKEN_FILE_ENV, ConfigError, Secrets, create_service_token_file
from loraloop.context import pass_app

log = logging.getLogger(__name__)


@click.command()
@click.option("--host", help="Address to listen on (default: [service] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: [service] port, 8765).")
@click.option("--model", help="Model id, local directory, .safetensors file, or 'tiny'.")
@click.option("--device", help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@click.option("--backend", type=click.Choice(["local", "ray"]),
              help="Where batches run (default: [service] backend): this process, or Ray worker actors.")
@click.option("--ray-address", help="--backend ray: 'local' (start a cluster here) or a running cluster's address.")
@click.option("--ray-workers", type=click.IntRange(0), help="--backend ray: worker actors; 0: one per GPU.")
@click.option("--insecure-no-token", is_flag=True,
              help="Allow a non-loopback --host without LORALOOP_SERVICE_TOKEN: anyone who reaches it may use it.")
@pass_app
def serve(app, host: str | None, port: int | None, model: str | None, device: str | None, backend: str | None,
          ray_address: str | None, ray_workers: int | None, insecure_no_token: bool) -> None:
    """Run the generation service (loads the model, then serves HTTP).

    \b
    Examples:
      loraloop serve --model tiny                  # offline, random weights, seconds to start
      LORALOOP_SERVICE_TOKEN=s3cret loraloop serve --host 0.0.0.0
      LORALOOP_SERVICE_TOKEN_FILE=data/service_token loraloop serve --host 0.0.0.0   # made on first start
      loraloop serve --backend ray --ray-address HEAD:6379   # batches on a Ray cluster's GPUs
    """
    from aiohttp import web

    from generation.pipeline import ModelLoadError
    from generation.server import create_app, exposure_refusal, listening_socket
    from generation.worker import BackendError

    given = {"host": host, "port": port, "model": model, "device": device, "backend": backend,
             "ray_address": ray_address, "ray_workers": ray_workers}
    changes = {k: v for k, v in given.items() if v is not None and v != ""}
    try:
        config = app.config.replace("service", **changes) if changes else app.config
        created = create_service_token_file()
        secrets = Secrets.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if created is not None:
        log.info("wrote a new service token to %s (%s); clients read it from there or from LORALOOP_SERVICE_TOKEN",
                 created, SERVICE_TOKEN_FILE_ENV)
    settings = config.service
    refusal = exposure_refusal(settings.host, secrets.service_token)
    if refusal and not insecure_no_token:
        raise click.ClickException(f"{refusal}, or pass --insecure-no-token.")
    if refusal:
        log.warning("listening on %s without LORALOOP_SERVICE_TOKEN (--insecure-no-token): anyone who can "
                    "reach it can use it", settings.host)
    try:
        sock = listening_socket(settings.host, settings.port)  # before the model loads: a busy port fails at once
    except OSError as exc:
        raise click.ClickException(f"Cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}. "
                                   "Stop whatever uses that port, or pick another with --port.") from None
    try:
        web.run_app(create_app(config, secrets), sock=sock, print=lambda message: log.info("%s", message.strip()))
    except (ModelLoadError, BackendError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        sock.close()  # run_app leaves a socket it was handed open when startup fails


def _parse_adapter(value: str) -> AdapterRef:
    """NAME, NAME:WEIGHT, NAME@VERSION or NAME@VERSION:WEIGHT."""
    name, _, weight = value.partition(":")
    try:
        return AdapterRef.from_dict({"name": name, "weight": float(weight) if weight else 1.0})
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use NAME or NAME:WEIGHT, e.g. pixel:0.8 ({exc})") from None


@click.command()
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("image.png"),
              show_default=True, help="Where to save; with --count N, NAME-1.png ... NAME-N.png.")
@click.option("-n", "--negative", "negative_prompt", default="", help="What the image should not show.")
@click.option("-a", "--adapter", "adapters", multiple=True, help="LoRA as NAME[@VERSION][:WEIGHT]; repeatable.")
@click.option("--steps", type=int, help="Denoising steps (default: the service's).")
@click.option("--guidance", type=float, help="CFG scale (default: the service's).")
@click.option("--seed", type=int, help="Seed of the first image; the same seed gives the same image.")
@click.option("--width", type=int, help="Width in pixels, a multiple of 8.")
@click.option("--height", type=int, help="Height in pixels, a multiple of 8.")
@click.option("--count", type=int, default=1, show_default=True, help="Images to make (seeds seed, seed+1, ...).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), help="Sampler (default: the service's).")
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from this image (img2img).")
@click.option("--strength", type=float, help="img2img: how far from the init image to go, 0-1.")
@click.option("--url", help="Service URL (default: http://[service] host:port).")
@pass_app
def imagine(app, prompt: str, output: Path, negative_prompt: str, adapters: tuple[str, ...], steps, guidance, seed,
            width, height, count: int, scheduler, init_image: Path | None, strength, url: str | None) -> None:
    """Generate an image with a running `loraloop serve`, showing progress.

    \b
    Examples:
      loraloop imagine "a red fox in the snow" -o fox.png
      loraloop imagine "a castle" --adapter pixel:0.8 --seed 42 --count 4 -o castle.png
      loraloop imagine "as a watercolour" --init-image photo.png --strength 0.6 -o watercolour.png
    """
    from generation.client import ServiceClient, ServiceError

    settings = app.config.service
    base_url = url or f"http://{settings.host}:{settings.port}"
    data = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "adapters": [_parse_adapter(a).to_dict() for a in adapters],
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "width": width,
        "height": height,
        "count": count,
        "scheduler": scheduler,
        "strength": strength,
        "requester": f"cli:{os.environ.get('USER', '')}",
    }
    if init_image is not None:
        data["init_image"] = base64.b64encode(init_image.read_bytes()).decode("ascii")
    try:
        request = JobRequest.from_dict(data)
    except InvalidRequest as exc:
        raise click.ClickException(exc.message) from None
    token = Secrets.from_env().service_token
    try:
        paths = asyncio.run(_imagine(ServiceClient(base_url, token=token), request, output))
    except ServiceError as exc:
        raise click.ClickException(exc.message) from None
    for path in paths:
        click.echo(f"saved {path}")


async def _imagine(client, request: JobRequest, output: Path) -> list[Path]:
    from tqdm import tqdm

    from generation.client import ServiceError

    # A terminal gets a live bar; a log or a pipe gets one line per change of state, not per redraw.
    interactive = sys.stderr.isatty()
    async with client:
        accepted = await client.submit(request)
        bar = tqdm(total=1, desc="queued", unit="step", leave=False, disable=not interactive)
        said = ""
        try:
            status = None
            async for status in client.events(accepted.id):
                if status.state.value == "queued":
                    state = f"queued (position {status.position + 1})"
                    bar.set_description(state)
                elif status.total_steps:
                    state = f"generating ({status.total_steps} steps)"
                    bar.set_description("generating")
                    bar.total, bar.n = status.total_steps, status.step
                    bar.refresh()
                else:
                    continue
                if not interactive and state != said:
                    click.echo(f"job {accepted.id}: {state}", err=True)
                    said = state
        except (KeyboardInterrupt, asyncio.CancelledError):
            await client.cancel(accepted.id)
            raise
        finally:
            bar.close()
        if status is None or status.state.value != "done":
            message = status.error.message if status and status.error else "the job did not finish"
            raise ServiceError("generation_failed", f"Job {accepted.id} {status.state.value if status else ''}: "
                               f"{message}")
        paths = []
        for image in status.images:
            path = output if len(status.images) == 1 else output.with_name(
                f"{output.stem}-{image.index + 1}{output.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(await client.image(accepted.id, image.index))
            paths.append(path)
        return paths


commands = [serve, imagine]
