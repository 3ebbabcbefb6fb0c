"""The one LoRA slot of the UNet when `[service] lora_hotswap` is on: each job's adapter is copied into it.

    slot = HotswapSlot(pipe, rank=64, targets=["to_q", "to_k", "to_v", "to_out.0"])   # before torch.compile
    slot.apply(spec.adapters)        # per batch: swap the job's adapter in (or silence the slot), set its weight

Why a slot: a compiled UNet recompiles (about a minute on a GPU) whenever its modules change, and
the ordinary way of switching adapters (`load_lora_weights` + `set_adapters`) adds modules for every
new adapter and makes each weight a Python constant, so every new adapter and every new weight would
recompile. diffusers' hotswap (`enable_lora_hotswap(target_rank=...)` before the first adapter, then
loads with `hotswap=True`) copies a new adapter into the tensors of the one already there, zero-padded
to `target_rank`, with the scalings held as tensors. Here the first adapter is a zero LoRA over
`targets`, made at start before compiling (peft pads and converts only before compilation), and a job's
weight is written into those scaling tensors in place instead of through `set_adapters`; weight 0 (or
no adapter) leaves the base model's output exactly.

What fits the slot, checked before diffusers is called (a failed hotswap deletes the slot):
  - one adapter file per image (two references to the same file add their weights, as elsewhere);
  - its UNet layers are among `targets` with this model's shapes, at rank <= the slot's rank;
  - plain LoRA weights (lora_A/lora_B): no DoRA, LoKr or bias terms.
peft then checks the adapter's config against the slot's (dropout, rsLoRA, one alpha for every layer);
when it refuses, diffusers has already removed the slot, so a zero slot with the same shapes replaces it
(the compiled graph's guards still hold, no recompile) and the file is remembered as not fitting.
A job that does not fit fails with the reason; several adapters per image and adapters on other
layers need `lora_hotswap = false` (the worker's ordinary path). A file's text-encoder layers are
loaded the ordinary way into the text encoders (never compiled, and diffusers cannot hotswap them),
once per file.

Floor: part of generation/, used on the worker thread only; torch, diffusers, peft.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from generation.adapters import AdapterFileError
from generation.jobs import AppliedAdapter

log = logging.getLogger(__name__)

SLOT = "hotswap"  # the peft adapter name of the slot in the UNet
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<kind>[AB])\.weight")


class SlotMismatch(RuntimeError):
    """The job's adapters cannot run in the slot; the message says why and what to change."""


@dataclass
class _Source:
    """One adapter file, read and converted once, ready to be copied into the slot."""

    label: str
    unet: dict[str, Any]  # its unet.* tensors, on the UNet's device and dtype
    alphas: dict[str, float] | None  # kohya files keep alpha apart from the weights
    metadata: dict[str, Any] | None  # diffusers files may carry their LoraConfig
    text_encoders: tuple[str, ...] = ()  # pipeline attributes that hold its text-encoder layers
    text_name: str = ""  # its ordinary adapter name in those text encoders


class HotswapSlot:
    """The slot: built at start from zeros, then holding one adapter file at a time."""

    def __init__(self, pipe: Any, *, rank: int, targets: Sequence[str]) -> None:
        self.pipe = pipe
        self.rank = rank
        self.targets = tuple(targets)
        self.holding: str | None = None  # sha256 of the adapter in the slot; None: zeros, or nothing wanted
        self.swap_seconds: deque[float] = deque(maxlen=256)  # recent swaps, newest last (logs, benchmarks)
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # UNet module -> lora_A, lora_B
        self._scalings: list[Any] = []  # each slot layer's scaling tensor, written in place
        self._unweighted: list[Any] = []  # those scalings at weight 1 for the adapter held
        self._weight: float | None = None
        self._sources: dict[str, _Source] = {}
        self._refused: dict[str, str] = {}  # sha256 -> why it does not fit
        self._build(check_compiled="error")

    def apply(self, adapters: Sequence[AppliedAdapter]) -> None:
        """Make the UNet (and text encoders) run exactly these adapters, swapping the slot if needed."""
        weights: dict[str, float] = {}
        labels: dict[str, str] = {}
        for adapter in adapters:
            sha = adapter.file.sha256
            weights[sha] = weights.get(sha, 0.0) + adapter.weight
            labels[sha] = adapter.file.label
        if len(weights) > 1:
            raise SlotMismatch(
                f"this service runs one adapter per image ([service] lora_hotswap) and the job asks for "
                f"{len(weights)} ({', '.join(labels.values())}); ask for one"
            )
        if not weights:
            self._set_weight(0.0)
            self._use_text_encoders(None, 0.0)
            return
        ((sha, weight),) = weights.items()
        adapter = next(a for a in adapters if a.file.sha256 == sha)
        source = self._source(adapter)
        if self.holding != sha:
            self._swap(sha, source)
        self._set_weight(weight)
        self._use_text_encoders(source, weight)

    def held(self) -> frozenset[str]:
        """The sha256s of the adapter files read and ready to swap in."""
        return frozenset(self._sources)

    def forget_except(self, sha256s: set[str]) -> None:
        """Drop what was read for adapters no longer in the directory (their text-encoder layers too)."""
        for sha in [s for s in self._sources if s not in sha256s]:
            self._drop(sha)
            if self.holding == sha:
                self.holding = None
                self._set_weight(0.0)
        self._refused = {sha: why for sha, why in self._refused.items() if sha in sha256s}

    # -- internals ------------------------------------------------------------------------

    def _build(self, check_compiled: str) -> None:
        """Put a zero LoRA of `rank` on every targeted Linear and Conv2d layer of the UNet: the slot."""
        unet = self.pipe.unet
        self._on_cuda = unet.device.type == "cuda"
        zeros: dict[str, Any] = {}
        self._shapes = {}
        for name, module in unet.named_modules():
            if not any(name == t or name.endswith("." + t) for t in self.targets):
                continue
            layer = getattr(module, "base_layer", module)  # peft wraps a layer once it has held an adapter
            shapes: tuple[tuple[int, ...], tuple[int, ...]]
            if isinstance(layer, torch.nn.Linear):
                shapes = ((self.rank, layer.in_features), (layer.out_features, self.rank))
            elif isinstance(layer, torch.nn.Conv2d):
                shapes = ((self.rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, self.rank, 1, 1))
            else:
                continue
            self._shapes[name] = shapes
            for kind, shape in zip("AB", shapes, strict=True):
                zeros[f"unet.{name}.lora_{kind}.weight"] = torch.zeros(shape, device=unet.device, dtype=unet.dtype)
        if not zeros:
            raise ValueError(f"[service] lora_hotswap_targets {list(self.targets)} match no Linear or Conv2d "
                             "layer of this UNet; name modules such as to_q, to_k, to_v, to_out.0")
        self.pipe.enable_lora_hotswap(target_rank=self.rank, check_compiled=check_compiled)
        self.pipe.load_lora_into_unet(zeros, network_alphas=None, unet=unet, adapter_name=SLOT)
        from peft.tuners.lora import LoraLayer

        self._scalings = [m.scaling[SLOT] for m in unet.modules() if isinstance(m, LoraLayer) and SLOT in m.scaling]
        self._unweighted = [s.clone() for s in self._scalings]
        self.holding, self._weight = None, None
        self._set_weight(0.0)
        log.info("hotswap slot: %d UNet layers at rank %d", len(self._shapes), self.rank)

    def _source(self, adapter: AppliedAdapter) -> _Source:
        sha, label = adapter.file.sha256, adapter.file.label
        if sha in self._refused:
            raise SlotMismatch(self._refused[sha])
        if sha in self._sources:
            return self._sources[sha]
        try:
            with adapter.file.verified_copy() as path:  # the very bytes the scan hashed
                state, alphas, metadata = self.pipe.lora_state_dict(str(path), return_lora_metadata=True)
        except AdapterFileError as exc:  # not remembered as refused: a reload may bring the file back
            log.error("adapter %s at %s: %s", label, adapter.file.path, exc)
            raise SlotMismatch(f"adapter {label} changed on disk since the adapters were last reloaded; "
                               "reload them and try again") from exc
        except (OSError, ValueError, KeyError) as exc:
            log.error("adapter %s does not fit this model: %s", label, exc)
            self._refused[sha] = f"adapter {label} does not fit this model"
            raise SlotMismatch(self._refused[sha]) from exc
        unet_part = {k: v for k, v in state.items() if k.startswith("unet.")}
        misfit = self._misfit(unet_part)
        if misfit:
            self._refused[sha] = f"adapter {label} does not fit the hotswap slot: {misfit}"
            raise SlotMismatch(self._refused[sha])
        unet = self.pipe.unet
        # Kept on the UNet's device, so a swap is a device-side copy (memory: the adapter's size, per file).
        unet_part = {k: v.to(unet.device, unet.dtype) for k, v in unet_part.items()}
        source = _Source(label, unet_part, alphas, metadata, text_name=f"lora_{sha[:16]}")
        source.text_encoders = self._load_text_encoders(source, state)
        self._sources[sha] = source
        return source

    def _misfit(self, unet_part: dict[str, Any]) -> str:
        """Why these UNet weights cannot go into the slot, or "" when they can."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        peft_state = {k.removeprefix("unet."): v for k, v in unet_part.items()}
        if peft_state and not any("lora_A" in k for k in peft_state):
            peft_state = convert_unet_state_dict_to_peft(peft_state)  # as diffusers does for older key styles
        outside: list[str] = []
        for key, tensor in peft_state.items():
            match = PEFT_KEY.fullmatch(key)
            if match is None:
                return f"{key} is not a plain LoRA weight (DoRA, LoKr and LoRA biases cannot be hotswapped)"
            module, kind = match["module"], match["kind"]
            if module not in self._shapes:
                outside.append(module)
                continue
            rank = tensor.shape[0] if kind == "A" else tensor.shape[1]
            if rank > self.rank:
                return f"its rank {rank} is over [service] lora_hotswap_rank {self.rank}"
            slot_shape = self._shapes[module][0 if kind == "A" else 1]
            fixed = (tensor.shape[1:], slot_shape[1:]) if kind == "A" else (tensor.shape[:1], slot_shape[:1])
            if tuple(fixed[0]) != tuple(fixed[1]):
                return f"its {module} has shape {tuple(tensor.shape)}, not this model's (made for another base model?)"
        if outside:
            layers = sorted(set(outside))
            return (f"{len(layers)} of its layers are outside [service] lora_hotswap_targets (such as "
                    f"{layers[0]}); add them there, or set lora_hotswap = false")
        return ""

    def _load_text_encoders(self, source: _Source, state: dict[str, Any]) -> tuple[str, ...]:
        from diffusers.utils.peft_utils import delete_adapter_layers

        loaded: list[str] = []
        for attr in TEXT_ENCODERS:
            encoder = getattr(self.pipe, attr, None)
            if encoder is None or not any(k.startswith(attr + ".") for k in state):
                continue
            try:
                self.pipe.load_lora_into_text_encoder(state, source.alphas, encoder, prefix=attr,
                                                      adapter_name=source.text_name, metadata=source.metadata)
            except Exception as exc:
                for done in loaded:
                    delete_adapter_layers(getattr(self.pipe, done), source.text_name)
                log.error("adapter %s does not fit this model's %s: %s", source.label, attr, exc)
                raise SlotMismatch(f"adapter {source.label} does not fit this model's {attr}") from exc
            loaded.append(attr)
        return tuple(loaded)

    def _swap(self, sha: str, source: _Source) -> None:
        start = time.perf_counter()
        if source.unet:
            try:
                self.pipe.load_lora_into_unet(dict(source.unet), network_alphas=source.alphas, unet=self.pipe.unet,
                                              adapter_name=SLOT, metadata=source.metadata, hotswap=True)
            except Exception as exc:
                # diffusers has deleted the slot; the same zero shapes take its place without a recompile
                log.error("adapter %s cannot be hotswapped: %s", source.label, exc)
                self._refused[sha] = f"adapter {source.label} cannot be hotswapped (its layers differ from the slot's)"
                self._drop(sha)
                self._build(check_compiled="ignore")
                raise SlotMismatch(self._refused[sha]) from exc
            self._unweighted = [s.clone() for s in self._scalings]  # peft wrote alpha/rank per layer
        else:  # text-encoder layers only: the UNet runs as the base model
            self._unweighted = [torch.zeros_like(s) for s in self._scalings]
        self.holding, self._weight = sha, None
        if self._on_cuda:
            torch.cuda.synchronize()  # the copies are asynchronous; time them whole
        self.swap_seconds.append(time.perf_counter() - start)
        log.info("adapter %s swapped into the slot in %.1f ms", source.label, 1000 * self.swap_seconds[-1])

    def _drop(self, sha: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers  # what pipe.delete_adapters runs per encoder

        source = self._sources.pop(sha)
        for attr in source.text_encoders:
            delete_adapter_layers(getattr(self.pipe, attr), source.text_name)

    def _set_weight(self, weight: float) -> None:
        if weight == self._weight:
            return
        for scaling, unweighted in zip(self._scalings, self._unweighted, strict=True):
            torch.mul(unweighted, weight, out=scaling)  # in place: the compiled graph reads this tensor
        self._weight = weight

    def _use_text_encoders(self, source: _Source | None, weight: float) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        loaded = {attr for s in self._sources.values() for attr in s.text_encoders}
        for attr in loaded:
            encoder = getattr(self.pipe, attr)
            if source is not None and attr in source.text_encoders:
                set_adapters_for_text_encoder([source.text_name], encoder, [weight])
                enable_lora_for_text_encoder(encoder)
            else:
                disable_lora_for_text_encoder(encoder)
