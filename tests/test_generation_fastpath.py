"""The GPU fast path, checked on the CPU: off by default, each option does what it says, the compiled
UNet never recompiles when adapters and weights change, and warm-up runs the configured shapes at start.

The speed itself needs a GPU: `bench/service.py --sd15` (bench/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from generation.adapters import AdapterFile
from generation.jobs import AppliedAdapter
from generation.pipeline import ModelLoadError, compile_unet, compiled_graph_count, load_model
from generation.testing import write_lora
from loraloop.config import ServiceConfig


def render(model, size: int = 64, batch: int = 1, steps: int = 2) -> np.ndarray:
    with torch.inference_mode():
        result = model.txt2img(prompt=["a lighthouse"] * batch, num_inference_steps=steps, width=size, height=size,
                               generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                               output_type="np")
    return result.images


def applied(path: Path, weight: float) -> AppliedAdapter:
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return AppliedAdapter(AdapterFile(name=path.stem, version=None, path=path, sha256=sha), path.stem, weight)


def test_the_fast_path_is_off_by_default_and_attention_is_sdpa(tiny_model_dir, data_dir):
    settings = ServiceConfig()
    assert (settings.dtype, settings.compile, settings.lora_hotswap, settings.channels_last,
            settings.vae_tiling, settings.warmup_sizes) == ("auto", False, False, False, False, [])
    model = load_model(str(tiny_model_dir), "cpu", data_dir)
    unet = model.txt2img.unet
    assert model.slot is None and not model.compiled and unet._compiled_call_impl is None
    assert model.dtype is torch.float32 and unet.dtype is torch.float32
    processors = [*unet.attn_processors.values(), *model.txt2img.vae.attn_processors.values()]
    assert {type(p).__name__ for p in processors} == {"AttnProcessor2_0"}


def test_dtype_bf16_loads_and_renders_on_the_cpu(tiny_model_dir, data_dir):
    model = load_model(str(tiny_model_dir), "cpu", data_dir, ServiceConfig(dtype="bf16"))
    assert model.dtype is torch.bfloat16 and model.txt2img.unet.dtype is torch.bfloat16
    assert np.isfinite(render(model)).all()


def test_channels_last_puts_the_convolutions_in_channels_last_and_still_renders(tiny_model_dir, data_dir):
    plain = render(load_model(str(tiny_model_dir), "cpu", data_dir))
    model = load_model(str(tiny_model_dir), "cpu", data_dir, ServiceConfig(channels_last=True))
    conv = model.txt2img.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert np.abs(render(model) - plain).max() < 0.05  # same model; only the summation order may differ


def test_vae_tiling_leaves_images_up_to_the_vae_size_alone_and_tiles_larger_ones(tiny_model_dir, data_dir):
    plain = load_model(str(tiny_model_dir), "cpu", data_dir)
    tiled = load_model(str(tiny_model_dir), "cpu", data_dir, ServiceConfig(vae_tiling=True))
    assert np.array_equal(render(plain, 64), render(tiled, 64))  # the tiny VAE's own size: one tile
    assert not np.array_equal(render(plain, 128), render(tiled, 128))  # larger: decoded in blended tiles


def test_hotswap_targets_that_match_no_layer_stop_the_load_with_the_key_to_fix(tiny_model_dir, data_dir):
    with pytest.raises(ModelLoadError, match="lora_hotswap_targets"):
        load_model(str(tiny_model_dir), "cpu", data_dir,
                   ServiceConfig(lora_hotswap=True, lora_hotswap_targets=["nope"]))


def test_swapping_adapters_and_weights_in_the_compiled_unet_never_recompiles(tiny_model_dir, data_dir, tmp_path):
    first = applied(write_lora(tiny_model_dir, tmp_path / "first.safetensors", seed=1), 1.0)
    kohya = applied(write_lora(tiny_model_dir, tmp_path / "kohya.safetensors", seed=2, kohya=True, rank=2), 0.5)
    model = load_model(str(tiny_model_dir), "cpu", data_dir, ServiceConfig(lora_hotswap=True, lora_hotswap_rank=4))
    # The eager backend: dynamo traces and guards exactly as for inductor, without minutes of kernel codegen.
    compile_unet(model.txt2img.unet, "default", backend="eager")
    base = render(model)
    graphs = compiled_graph_count()
    images = []
    for adapters in ([first], [kohya], [AppliedAdapter(first.file, "first", 0.7)], [], [first]):
        model.slot.apply(adapters)
        images.append(render(model))
    assert compiled_graph_count() == graphs, "a swap or a new weight recompiled the UNet"
    assert np.array_equal(images[3], base) and np.array_equal(images[0], images[4])
    assert len({image.tobytes() for image in images}) == 4  # each adapter and weight made its own picture
    render(model, batch=3)  # a shape not seen before does compile: the counter sees recompiles
    assert compiled_graph_count() > graphs


async def test_warm_up_runs_every_configured_size_at_every_batch_size_before_the_service_is_ready(make_service):
    running = await make_service(warmup_sizes=[[64, 64], [32, 48]], warmup_batch_sizes=[1, 2])
    assert running.service.worker.warmed == [(64, 64, 1), (64, 64, 2), (32, 48, 1), (32, 48, 2)]
    default_batches = await make_service(warmup_sizes=[[64, 64]], max_batch=3)
    assert default_batches.service.worker.warmed == [(64, 64, 1), (64, 64, 3)]  # 1 and max_batch
    assert (await make_service()).service.worker.warmed == []
