"""LoRA adapters through the real service: applied per request, versioned, reloaded, and refused when unsafe."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from test_generation_pngmeta import lora_hashes, parse_a1111

from generation.client import ServiceClient, ServiceError
from generation.contract import AdapterRef, JobRequest, JobState
from generation.pngmeta import read_parameters
from generation.testing import write_lora
from loraloop.hashes import lora_hash


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three different random LoRAs for the tiny UNet, written once: two diffusers-format, one kohya."""
    folder = tmp_path_factory.mktemp("loras")
    return {
        "first": write_lora(tiny_model_dir, folder / "first.safetensors", seed=1, description="crisp lines"),
        "second": write_lora(tiny_model_dir, folder / "second.safetensors", seed=2),
        "kohya": write_lora(tiny_model_dir, folder / "kohya.safetensors", seed=3, kohya=True),
        "text": write_lora(tiny_model_dir, folder / "text.safetensors", seed=4, text_encoder=True),
        "rank8": write_lora(tiny_model_dir, folder / "rank8.safetensors", seed=5, rank=8),
    }


def install(source: Path, adapters_dir: Path, relative: str) -> Path:
    target = adapters_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


async def render(client: ServiceClient, adapters=(), seed: int = 5) -> tuple[np.ndarray, bytes]:
    request = JobRequest.from_dict({"prompt": "a harbour at dusk", "seed": seed, "steps": 3,
                                    "adapters": [{"name": n, "weight": w} for n, w in adapters]})
    accepted = await client.submit(request)
    final = [s async for s in client.events(accepted.id)][-1]
    assert final.state is JobState.DONE, final.error
    png = await client.image(accepted.id, 0)
    return np.asarray(Image.open(io.BytesIO(png))), png


async def test_an_adapter_changes_the_image_and_weight_zero_equals_the_base(make_service, lora_files):
    running = await make_service()
    install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        base, _ = await render(client)
        styled, png = await render(client, [("pixel", 1.0)])
        zero, _ = await render(client, [("pixel", 0.0)])
        again, _ = await render(client)  # switching adapters off restores the base exactly
    assert not np.array_equal(base, styled)
    assert np.array_equal(base, zero)
    assert np.array_equal(base, again)
    assert "<lora:pixel:1>" in read_parameters(png)


async def test_the_png_names_each_lora_by_a1111s_hash_of_its_file(make_service, lora_files):
    running = await make_service()
    plain = install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    # A Civitai-style file: its sshs_model_hash is what A1111 shows, so the PNG must say the same.
    tensors = load_file(lora_files["kohya"])
    save_file(tensors, running.adapters_dir / "civitai.safetensors",
              metadata={"sshs_model_hash": "c0ffee" * 10 + "beef"})
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        _, png = await render(client, [("pixel", 1.0), ("civitai", 0.5)])
    fields = parse_a1111(read_parameters(png) or "")
    with plain.open("rb") as stream:  # A1111's own rule: the sha256 of what follows the header
        header = int.from_bytes(stream.read(8), "little")
        stream.seek(8 + header)
        after_header = hashlib.sha256(stream.read()).hexdigest()
    assert lora_hashes(fields) == {"pixel": after_header[:12], "civitai": "c0ffeec0ffee"}


async def test_reload_picks_up_a_new_version_and_a_pinned_version_still_works(make_service, lora_files):
    running = await make_service()
    install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        v1, _ = await render(client, [("pixel", 1.0)])
        with pytest.raises(ServiceError) as unknown:
            await render(client, [("pixel@2", 1.0)])
        assert unknown.value.code == "unknown_adapter" and "pixel@1" in unknown.value.message
        install(lora_files["second"], running.adapters_dir, "pixel/v2.safetensors")
        listed = await client.reload_adapters()
        assert [(a.name, a.version, a.latest) for a in listed] == [("pixel", 1, False), ("pixel", 2, True)]
        latest, _ = await render(client, [("pixel", 1.0)])
        pinned, _ = await render(client, [("pixel@1", 1.0)])
    assert np.array_equal(v1, pinned)
    assert not np.array_equal(v1, latest)


async def test_kohya_adapters_load_and_several_adapters_combine(make_service, lora_files):
    running = await make_service()
    install(lora_files["kohya"], running.adapters_dir, "civitai.safetensors")
    install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        base, _ = await render(client)
        kohya, _ = await render(client, [("civitai", 1.0)])
        both, _ = await render(client, [("civitai", 0.7), ("pixel", 0.7)])
    assert not np.array_equal(base, kohya)
    assert not np.array_equal(kohya, both)


async def test_pickle_and_corrupt_files_are_skipped_and_the_rest_keep_serving(make_service, lora_files, caplog):
    running = await make_service()
    adapters = running.adapters_dir
    install(lora_files["first"], adapters, "good/v1.safetensors")
    (adapters / "evil.bin").write_bytes(b"\x80\x04 pretend pickle")
    (adapters / "evil2").mkdir()
    (adapters / "evil2" / "v1.ckpt").write_bytes(b"\x80\x04 pretend pickle")
    (adapters / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    whole = lora_files["second"].read_bytes()
    (adapters / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    async with ServiceClient(running.url) as client:
        listed = await client.reload_adapters()
        assert [a.name for a in listed] == ["good"]
        assert listed[0].description == "crisp lines" and listed[0].base_model == "tiny"
        with pytest.raises(ServiceError) as refused:
            await render(client, [("garbage", 1.0)])
        assert refused.value.http_status == 400 and "Available adapters: good" in refused.value.message
        await render(client, [("good", 1.0)])
    logged = caplog.text
    assert "refusing" in logged and "evil.bin" in logged and "v1.ckpt" in logged
    assert "garbage.safetensors" in logged and "truncated.safetensors" in logged


async def test_adapter_names_cannot_climb_out_of_the_directory(service):
    async with ServiceClient(service.url) as client:
        for name in ("../secrets", "/etc/passwd", ".hidden", "a/b", "pixel@v2"):
            # Built directly: from_dict would refuse the name before it left the client.
            request = JobRequest(prompt="x", adapters=(AdapterRef(name=name),))
            with pytest.raises(ServiceError) as refused:
                await client.submit(request)
            assert refused.value.http_status == 400, name
            assert "not valid" in refused.value.message


async def test_an_adapter_that_does_not_fit_the_model_fails_its_job_and_the_service_keeps_serving(
    make_service, lora_files
):
    import torch
    from safetensors.torch import load_file, save_file

    running = await make_service()
    # Readable, LoRA-shaped, but made for a wider model: every lora_A has the wrong input size.
    tensors = {key: torch.randn(value.shape[0], value.shape[1] * 2) if "lora_A" in key else value
               for key, value in load_file(lora_files["first"]).items()}
    path = running.adapters_dir / "wide.safetensors"
    save_file(tensors, str(path))
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        base, _ = await render(client)
        request = JobRequest.from_dict({"prompt": "x", "steps": 2, "adapters": [{"name": "wide"}]})
        accepted = await client.submit(request)
        final = [s async for s in client.events(accepted.id)][-1]
        assert final.state is JobState.FAILED
        assert final.error.code == "generation_failed" and "wide does not fit this model" in final.error.message
        after, _ = await render(client)
    assert np.array_equal(base, after)



# -- [service] lora_hotswap: one slot, swapped in place (generation/hotswap.py) ---------------------------------


async def render_all(running, cases) -> list[np.ndarray]:
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        return [(await render(client, adapters))[0] for adapters in cases]


async def test_hotswapped_adapters_give_the_same_pixels_as_adapters_loaded_normally(make_service, lora_files):
    ordinary = await make_service()
    swapping = await make_service(lora_hotswap=True, lora_hotswap_rank=4)  # the files' rank: no padding
    install(lora_files["first"], ordinary.adapters_dir, "pixel/v1.safetensors")
    install(lora_files["kohya"], ordinary.adapters_dir, "civitai.safetensors")
    install(lora_files["text"], ordinary.adapters_dir, "clip.safetensors")  # UNet and text-encoder layers
    install(lora_files["first"], ordinary.adapters_dir, "twin.safetensors")  # the same file under two names
    cases = [(), [("pixel", 1.0)], [("civitai", 0.8)], [("clip", 1.0)], [("pixel", 0.5)],
             [("pixel", 0.25), ("twin", 0.25)], [("pixel", 0.0)], ()]
    expected = await render_all(ordinary, cases)
    swapped = await render_all(swapping, cases)
    for case, want, got in zip(cases, expected, swapped, strict=True):
        assert np.array_equal(want, got), case
    assert len({image.tobytes() for image in expected}) == 5  # base, pixel, civitai, clip, pixel at 0.5
    unet = swapping.service.worker.model.txt2img.unet
    assert set(unet.peft_config) == {"hotswap"}  # the UNet never held a second adapter
    assert swapping.service.worker.model.slot.swap_seconds  # adapters really were swapped in


async def test_with_hotswap_a_job_the_slot_cannot_run_fails_with_the_reason_and_the_slot_keeps_serving(
    make_service, lora_files
):
    from safetensors.torch import load_file, save_file

    running = await make_service(lora_hotswap=True, lora_hotswap_rank=4)
    install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    install(lora_files["second"], running.adapters_dir, "ink.safetensors")
    install(lora_files["rank8"], running.adapters_dir, "big.safetensors")
    # One layer at rank 2, the rest at 4 and no alphas: diffusers derives per-layer alphas, which peft's
    # hotswap refuses only after diffusers has removed the slot.
    tensors = load_file(lora_files["first"])
    first_a = sorted(key for key in tensors if "lora_A" in key)[0]
    first_b = first_a.replace("lora_A", "lora_B")
    tensors[first_a], tensors[first_b] = tensors[first_a][:2].contiguous(), tensors[first_b][:, :2].contiguous()
    save_file(tensors, str(running.adapters_dir / "mixed.safetensors"))
    refusals = {
        "big": "rank 8 is over [service] lora_hotswap_rank 4",
        "pixel+ink": "one adapter per image",
        "mixed": "mixed cannot be hotswapped",
    }
    async with ServiceClient(running.url) as client:
        await client.reload_adapters()
        base, _ = await render(client)
        pixel, _ = await render(client, [("pixel", 1.0)])
        for names, reason in [*refusals.items(), ("mixed", "mixed cannot be hotswapped")]:  # mixed twice: remembered
            request = JobRequest.from_dict({"prompt": "x", "steps": 2,
                                            "adapters": [{"name": name} for name in names.split("+")]})
            accepted = await client.submit(request)
            final = [s async for s in client.events(accepted.id)][-1]
            assert final.state is JobState.FAILED and reason in final.error.message, (names, final.error)
        pixel_again, _ = await render(client, [("pixel", 1.0)])
        base_again, _ = await render(client)
    assert np.array_equal(pixel, pixel_again)
    assert np.array_equal(base, base_again)
async def test_a_fifo_or_a_symlink_out_of_the_directory_is_skipped_and_the_service_never_freezes(
    make_service, lora_files, tmp_path, caplog
):
    import asyncio
    import os

    running = await make_service()
    adapters = running.adapters_dir
    install(lora_files["first"], adapters, "good/v1.safetensors")
    os.mkfifo(adapters / "fifo.safetensors")
    (adapters / "pipe").mkdir()
    os.mkfifo(adapters / "pipe" / "v1.safetensors")
    outside = install(lora_files["second"], tmp_path / "elsewhere", "secret.safetensors")
    (adapters / "escape.safetensors").symlink_to(outside)
    (adapters / "away").symlink_to(outside.parent, target_is_directory=True)
    (adapters / "alias.safetensors").symlink_to(adapters / "good" / "v1.safetensors")  # inside: fine
    async with ServiceClient(running.url) as client:
        # safe_open on a FIFO blocked holding the GIL: /healthz and everything else froze.
        listed = await asyncio.wait_for(client.reload_adapters(), timeout=30)
        assert sorted(a.name for a in listed) == ["alias", "good"]
        assert (await client.health()).status == "ok"
        await render(client, [("alias", 1.0)])
    assert "fifo.safetensors: not a regular file" in caplog.text and "pipe/v1.safetensors" in caplog.text
    assert "escape.safetensors: a symlink out of the adapters directory" in caplog.text
    assert "away: a symlink out of the adapters directory" in caplog.text


async def test_the_hash_a_job_reports_is_of_the_bytes_it_loaded(make_service, lora_files):
    running = await make_service()
    path = install(lora_files["first"], running.adapters_dir, "pixel/v1.safetensors")
    async with ServiceClient(running.url) as client:
        [scanned] = await client.reload_adapters()
        # Swapped after the scan: loading it would report the first file's hash for the second's weights.
        shutil.copyfile(lora_files["second"], path)
        accepted = await client.submit(JobRequest.from_dict({"prompt": "x", "steps": 1,
                                                             "adapters": [{"name": "pixel"}]}))
        final = [s async for s in client.events(accepted.id)][-1]
        assert final.state is JobState.FAILED and "changed on disk" in final.error.message
        [rescanned] = await client.reload_adapters()
        assert rescanned.sha256 != scanned.sha256
        _, png = await render(client, [("pixel", 1.0)])
    accepted_status = await ServiceClient(running.url).status(accepted.id)
    assert accepted_status.adapters[0].sha256 == scanned.sha256
    with path.open("rb") as loaded:  # the PNG names the new bytes by A1111's hash of them
        assert lora_hash(loaded)[:12] in read_parameters(png)


async def test_descriptions_are_capped_and_stripped_of_escape_codes_everywhere_they_are_listed(
    make_service, tiny_model_dir, data_dir
):
    from click.testing import CliRunner

    from loraloop.cli import cli

    running = await make_service()
    hostile = "\x1b[2J\x1b]0;pwned\x07red\nand " + "long " * 300
    write_lora(tiny_model_dir, running.adapters_dir / "loud.safetensors", description=hostile)
    (running.adapters_dir / "newline\n").mkdir()
    write_lora(tiny_model_dir, running.adapters_dir / "newline\n" / "v1.safetensors")
    async with ServiceClient(running.url) as client:
        [listed] = await client.reload_adapters()
    assert listed.name == "loud"
    assert "\x1b" not in listed.description and "\n" not in listed.description and "\x07" not in listed.description
    assert listed.description.startswith(" [2J ]0;pwned red and long") and len(listed.description) <= 500
    result = CliRunner().invoke(cli, ["adapters", "list"], env={"LORALOOP_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    assert "loud" in result.output and "\x1b" not in result.output and "\x07" not in result.output
