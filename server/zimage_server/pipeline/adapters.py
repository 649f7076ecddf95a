"""LoRA adapters on the transformer, chosen per batch without recompiling.

Every adapter the settings name is read at start into device memory, its scaling (alpha over
rank) folded into its B matrices. The transformer gets one peft LoRA layer ("slot") on each
linear any adapter targets, of one fixed rank: the ceiling. A batch's adapters are copied into
the slots side by side along the rank (the sum of low-rank products is the product of the
concatenated factors), each one's B times its scale; whatever the slots do not use is zero, and
adds exactly nothing. The slots' shapes never change, so a compiled transformer runs any
adapter, any mix of them and any scale without a recompile, and a swap is a copy on the device.

diffusers' own hot-swap (``enable_lora_hotswap``, ``load_lora_weights(..., hotswap=True)``)
replaces one loaded adapter by another read again from its state dict; this keeps them all on
the device and mixes several in one slot.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zimage_server.core.adapters import (
    DEFAULT_WEIGHT_NAME,
    AdapterSetting,
    AdapterSource,
    Selection,
)
from zimage_server.core.sources import hub_offline

logger = logging.getLogger(__name__)

SLOT = "zimage"  # the peft adapter name of the slots
PREFIX = "transformer."  # the diffusers LoRA format's keys for the transformer


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why."""


@dataclass
class Adapter:
    name: str
    source: str
    scale: float  # a request's default
    rank: int  # its largest rank over its modules
    # module path -> (A: rank x in, B times alpha over rank: out x rank), on the device
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "scale": self.scale,
            "rank": self.rank,
            "modules": len(self.modules),
            "parameters": self.parameters,
        }


@dataclass
class AdapterBank:
    """The loaded adapters, those that failed with why, and the slots they are swapped into."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rank: int = 0  # the slots' rank: the ceiling of a batch's adapters' ranks together
    max_per_request: int = 1
    slots: dict[str, Any] = field(default_factory=dict)  # module path -> peft LoRA layer
    active: Selection = ()
    swaps: int = 0
    last_swap_seconds: float = 0.0

    def check(self, selection: Selection) -> None:
        """Raise ``ValueError`` naming what a request's adapters cannot be here."""
        for name, _ in selection:
            if name in self.failed:
                raise ValueError(
                    f"adapter {name!r} failed to load when the server started: {self.failed[name]}"
                )
            if name not in self.adapters:
                known = ", ".join(sorted(self.adapters)) or "none are loaded"
                raise ValueError(f"adapter {name!r} is not loaded here; the adapters are: {known}")
        if len(selection) > self.max_per_request:
            raise ValueError(
                f"{len(selection)} adapters in one request; this server combines at most "
                f"{self.max_per_request} (lora_max_per_request)"
            )
        rank = sum(self.adapters[name].rank for name, _ in selection)
        if rank > self.rank:
            raise ValueError(
                f"these adapters' ranks add up to {rank}, past this server's ceiling of {self.rank} "
                "(lora_max_rank); ask for fewer at once"
            )

    def activate(self, selection: Selection) -> None:
        """Copy ``selection``'s adapters into the slots (nothing to do if they are there)."""
        if selection == self.active or not self.slots:
            return
        self.check(selection)
        started = time.perf_counter()
        chosen = [(self.adapters[name], scale) for name, scale in selection]
        with torch.no_grad():
            for path, layer in self.slots.items():
                a_slot = layer.lora_A[SLOT].weight
                b_slot = layer.lora_B[SLOT].weight
                offset = 0
                for adapter, scale in chosen:
                    pair = adapter.modules.get(path)
                    if pair is None or scale == 0:
                        continue
                    a, b = pair
                    rank = a.shape[0]
                    a_slot[offset : offset + rank].copy_(a)
                    torch.mul(b, scale, out=b_slot[:, offset : offset + rank])
                    offset += rank
                if offset < self.rank:
                    a_slot[offset:].zero_()
                    b_slot[:, offset:].zero_()
        self.active = selection
        self.swaps += 1
        self.last_swap_seconds = time.perf_counter() - started

    def report(self) -> dict[str, Any]:
        return {
            "loaded": [adapter.describe() for adapter in self.adapters.values()],
            "failed": dict(self.failed),
            "rank_ceiling": self.rank,
            "max_per_request": self.max_per_request,
        }


def load_bank(
    transformer: torch.nn.Module,
    settings: list[AdapterSetting],
    *,
    max_per_request: int,
    max_rank: int | None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> AdapterBank:
    """Read each adapter (one that fails is recorded with why, and the others load), choose the
    rank ceiling, and give the transformer its slots. Call before fp8 and compile."""
    bank = AdapterBank(max_per_request=max_per_request)
    if not settings:
        return bank
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    linears = {
        name: module for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)
    }
    for setting in settings:
        started = time.perf_counter()
        try:
            path = local_file(AdapterSource.parse(setting.source), cache_dir, token)
            modules, rank = read_adapter(path, linears)
        except Exception as exc:  # a bad file costs its adapter, never the server
            reason = str(exc) if isinstance(exc, AdapterError) else f"{type(exc).__name__}: {exc}"
            bank.failed[setting.name] = reason
            logger.error("adapter %s (%s) not loaded: %s", setting.name, setting.source, reason)
            continue
        bank.adapters[setting.name] = Adapter(
            setting.name,
            setting.source,
            setting.scale,
            rank,
            {path: (a.to(device, dtype), b.to(device, dtype)) for path, (a, b) in modules.items()},
        )
        logger.info(
            "adapter %s: rank %d on %d linears from %s in %.2fs",
            setting.name,
            rank,
            len(modules),
            setting.source,
            time.perf_counter() - started,
        )
    ranks = sorted((adapter.rank for adapter in bank.adapters.values()), reverse=True)
    bank.rank = max_rank if max_rank is not None else sum(ranks[:max_per_request])
    for name, adapter in list(bank.adapters.items()):
        if adapter.rank > bank.rank:
            del bank.adapters[name]
            bank.failed[name] = (
                f"its rank {adapter.rank} is above the ceiling {bank.rank} (lora_max_rank); raise the "
                "ceiling or use an adapter of a lower rank"
            )
            logger.error("adapter %s not loaded: %s", name, bank.failed[name])
    if bank.adapters:
        bank.slots = install_slots(
            transformer, bank.rank, sorted({p for a in bank.adapters.values() for p in a.modules})
        )
    return bank


def local_file(source: AdapterSource, cache_dir: str | None, token: str | None) -> Path:
    """The adapter's .safetensors file on local disk, fetched from the Hub (or its cache) first."""
    if source.scheme == "hf":
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(
                    source.location,
                    source.filename or DEFAULT_WEIGHT_NAME,
                    revision=source.revision,
                    cache_dir=cache_dir,
                    token=token,
                    local_files_only=hub_offline(),
                )
            )
        except Exception as exc:
            raise AdapterError(f"{source} could not be fetched ({type(exc).__name__}: {exc})") from exc
    path = Path(source.location).expanduser()
    if path.is_dir():
        found = (
            [path / DEFAULT_WEIGHT_NAME]
            if (path / DEFAULT_WEIGHT_NAME).is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if len(found) != 1:
            raise AdapterError(
                f"the folder {path} holds {len(found)} .safetensors files; name the file, or keep one "
                f"({DEFAULT_WEIGHT_NAME})"
            )
        path = found[0]
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path} is not a .safetensors file (pickled weights are not loaded)")
    return path


def read_adapter(
    path: Path, linears: dict[str, torch.nn.Linear]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """An adapter file's pairs of factors per linear of the transformer, B scaled by alpha over
    rank, and its largest rank. Other formats (kohya, ai-toolkit) are converted by diffusers."""
    from diffusers import ZImagePipeline

    try:
        state, metadata = ZImagePipeline.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True, local_files_only=True
        )
    except Exception as exc:
        raise AdapterError(
            f"{path.name} cannot be read as LoRA weights ({type(exc).__name__}: {exc})"
        ) from exc
    config = {key.removeprefix(PREFIX): value for key, value in (metadata or {}).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise AdapterError(
                f"{path.name}: {key!r} is not a LoRA factor (lora_A.weight or lora_B.weight); only plain "
                "LoRA is served (no LoKr, DoRA or LoRA biases)"
            )
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise AdapterError(f"{path.name} holds no LoRA weights for the transformer")
    modules = {}
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise AdapterError(f"{path.name}: {module} has only its lora_{''.join(factors)} factor")
        linear = linears.get(module)
        if linear is None:
            raise AdapterError(
                f"{path.name}: the transformer has no linear layer {module!r}; is it for this model?"
            )
        a, b = factors["A"], factors["B"]
        rank = a.shape[0]
        if a.shape != (rank, linear.in_features) or b.shape != (linear.out_features, rank):
            raise AdapterError(
                f"{path.name}: {module}'s factors are {tuple(a.shape)} and {tuple(b.shape)}; the layer is "
                f"{linear.in_features} in, {linear.out_features} out: is it for this model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path.name}: {module}'s factors hold NaN or infinite values")
        modules[module] = (a, b.float() * _scaling(config, module, rank))
    return modules, max(a.shape[0] for a, _ in modules.values())


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: lora_alpha (or its alpha_pattern's) over the rank (or its
    square root, with use_rslora); an adapter without that metadata was trained at alpha = rank."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def install_slots(transformer: Any, rank: int, targets: Iterable[str]) -> dict[str, Any]:
    """One peft LoRA layer of ``rank`` on each of ``targets``, zero (it adds nothing)."""
    from peft import LoraConfig

    names = list(targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # a scaling of 1: the scales are in the copied factors
        lora_dropout=0.0,
        target_modules="^(" + "|".join(re.escape(name) for name in names) + ")$",
        init_lora_weights=False,
    )
    transformer.add_adapter(config, adapter_name=SLOT)
    modules = dict(transformer.named_modules())
    slots = {name: modules[name] for name in names}
    with torch.no_grad():
        for layer in slots.values():
            for part in (layer.lora_A[SLOT], layer.lora_B[SLOT]):
                part.weight.zero_()
                part.weight.requires_grad_(False)
    return slots
