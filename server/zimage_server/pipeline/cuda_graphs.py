"""CUDA graphs of the pipeline's parts, one per input shape.

A compiled part is still hundreds of kernels launched one by one from Python: the text encoder
(36 decoder layers on a prompt of a few dozen tokens) spends far longer launching than the GPU
spends computing, and the transformer's forward is about 800 launches. A CUDA graph replays a
whole call with one launch, so the GPU no longer waits for the host. At 1024x1024 on an H100
the host keeps ahead of the transformer and its graphs gain nothing measurable; the text
encoder is launch-bound (docs/performance.md).

Graphs need fixed shapes and addresses, so each input shape gets its own graph with its own
input buffers: a shape's first call runs as usual, its second captures the graph (only
repeated shapes pay for one), later ones copy their inputs into the graph's buffers and replay
it. A part's graphs share one memory pool: they never run at once, so the pool holds about
one call's activations however many shapes there are. Callers get copies of the outputs.

A shape whose capture fails (an operation that cannot be captured) runs as usual from then
on; the failure is logged once.

Behind a compile gate (block_compile.py), nothing is captured or replayed until it opens: while
one thread compiles and another serves, neither captures a graph beside the other's work.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from zimage_server.pipeline.block_compile import OPEN, CompileGate

logger = logging.getLogger(__name__)

Key = tuple[Any, ...]
# How many shapes seen once are remembered (waiting for a second sighting to be captured).
SEEN_LIMIT = 4096
# What graphs can cover; "text_encoder" needs the text encoder to use SDPA attention.
_PLAIN = (type(None), bool, int, float, str)
# The text encoder's graphs keep every layer's hidden states as outputs (the pipeline reads one
# of them): up to 0.4 GB a graph for four 512-token prompts, so fewer of them are kept.
TEXT_ENCODER_MAX_GRAPHS = 8


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # the call's leaves, tensors replaced by the graph's own buffers
    outputs: list[Any]
    output_spec: pytree.TreeSpec


class ShapeGraphs:
    """Stands in for a module's ``forward`` (see ``install``): same arguments, same results."""

    def __init__(
        self, forward: Callable[..., Any], name: str, max_graphs: int = 32, gate: CompileGate = OPEN
    ) -> None:
        self.forward = forward
        self.gate = gate
        self.name = name
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self.seen: OrderedDict[Key, None] = OrderedDict()  # shapes run once, the latest last
        self.failed: set[Key] = set()
        self.pool: Any = None
        self.captures = 0
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.gate.opened:
            return self.forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _key(leaves, spec)
        if key is None or key in self.failed:
            return self.forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # a shape's first call runs as usual (and compiles)
                self.seen[key] = None
                while len(self.seen) > SEEN_LIMIT:
                    self.seen.popitem(last=False)
                return self.forward(*args, **kwargs)
            result = self.forward(*args, **kwargs)
            self._capture(key, leaves, spec)
            return result
        self.graphs.move_to_end(key)
        for buffer, value in zip(entry.inputs, leaves, strict=True):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        entry.graph.replay()
        self.replays += 1
        # The outputs are rewritten by the next replay: callers get their own copies.
        outputs = [item.clone() if isinstance(item, torch.Tensor) else item for item in entry.outputs]
        return pytree.tree_unflatten(outputs, entry.output_spec)

    def _capture(self, key: Key, leaves: list[Any], spec: pytree.TreeSpec) -> None:
        inputs = [item.clone() if isinstance(item, torch.Tensor) else item for item in leaves]
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                result = self.forward(*args, **kwargs)
        except Exception as exc:  # e.g. an operation that synchronizes with the host
            self.failed.add(key)
            logger.warning("no CUDA graph for %s inputs %s: %s", self.name, _shapes(leaves), exc)
            return
        outputs, output_spec = pytree.tree_flatten(result)
        self.graphs[key] = _Graph(graph, inputs, outputs, output_spec)
        self.captures += 1
        logger.info("captured a CUDA graph of the %s for inputs %s", self.name, _shapes(leaves))
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)


def _key(leaves: list[Any], spec: pytree.TreeSpec) -> Key | None:
    """The shape of a call, or None for calls a graph does not cover: training, CPU tensors,
    arguments other than tensors and plain values (those are part of the key)."""
    if torch.is_grad_enabled():
        return None
    key: list[Any] = [spec]
    tensors = 0
    for item in leaves:
        if isinstance(item, torch.Tensor):
            if not item.is_cuda:
                return None
            key.append((tuple(item.shape), item.dtype, item.device))
            tensors += 1
        elif isinstance(item, _PLAIN):
            key.append((type(item), item))
        else:
            return None
    return tuple(key) if tensors else None


def _shapes(leaves: list[Any]) -> list[tuple[int, ...]]:
    return [tuple(item.shape) for item in leaves if isinstance(item, torch.Tensor)]


def install(
    module: torch.nn.Module, name: str, max_graphs: int = 32, gate: CompileGate = OPEN
) -> ShapeGraphs:
    """Route ``module``'s calls through CUDA graphs (``nn.Module.__call__`` calls the
    instance's ``forward``, which this replaces) once ``gate`` is open."""
    graphed = ShapeGraphs(module.forward, name, max_graphs, gate)
    module.forward = graphed
    return graphed


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A (batch, tokens) padding mask as the (batch, 1, tokens, tokens) boolean mask that
    transformers builds for SDPA: each token sees itself, the tokens before it, and no padding.

    transformers decides whether the mask can be dropped by reading the padding mask on the
    host, which a CUDA graph cannot capture; a ready 4D mask is passed on as it is."""
    tokens = attention_mask.shape[-1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=attention_mask.device).tril_()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class _TextEncoderForward:
    """The text encoder's ``forward`` with its padding mask made 4D before the graphs."""

    def __init__(self, graphs: ShapeGraphs) -> None:
        self.graphs = graphs

    def __call__(self, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = causal_padding_mask(attention_mask)
        return self.graphs(*args, attention_mask=attention_mask, **kwargs)


def install_text_encoder(
    text_encoder: torch.nn.Module, max_graphs: int = 32, gate: CompileGate = OPEN
) -> ShapeGraphs | None:
    """CUDA graphs for a transformers text encoder; None (and nothing changed) unless it
    attends through SDPA, the implementation the 4D mask is made for."""
    implementation = getattr(text_encoder.config, "_attn_implementation", None)
    if implementation != "sdpa":
        logger.warning("no CUDA graphs for the text encoder: its attention is %s, not sdpa", implementation)
        return None
    graphs = ShapeGraphs(text_encoder.forward, "text encoder", min(max_graphs, TEXT_ENCODER_MAX_GRAPHS), gate)
    text_encoder.forward = _TextEncoderForward(graphs)
    return graphs
