"""CUDA graphs for the transformer's forward, one per input shape.

After compile, a forward is about 800 kernels, launched by the eager Python around the
compiled blocks (patchify, RoPE tables, padding) and the blocks' own wrappers. Where the host
cannot keep ahead of the GPU (small images, a CPU busy with other work) the GPU waits for
those launches; a CUDA graph replays the whole forward with one launch. At 1024x1024 on an
H100 the host keeps ahead and graphs gain nothing measurable (docs/performance.md).

Graphs need fixed shapes and addresses, so each input shape gets its own graph with
its own input buffers: a shape's first forward runs as usual, its second captures the graph
(only repeated shapes pay for one), later ones copy their inputs into the
graph's buffers and replay it. All graphs share one memory pool: they never run at once, so
the pool holds about one forward's activations however many shapes there are.

A shape whose capture fails (an operation that cannot be captured) runs as usual from then
on; the failure is logged once.

Shapes include each prompt's token count, so traffic of varied prompts brings many shapes,
each captured on its second sighting: the setting is off by default (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

Key = tuple[Any, ...]
# How many shapes seen once are remembered (waiting for a second sighting to be captured).
SEEN_LIMIT = 4096


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    latents: list[torch.Tensor]
    timestep: torch.Tensor
    captions: list[torch.Tensor]
    outputs: list[torch.Tensor]


class GraphedForward:
    """Stands in for ``transformer.forward`` (see ``install``); same arguments, same results."""

    def __init__(self, forward: Callable[..., Any], max_graphs: int = 32) -> None:
        self.forward = forward
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self.seen: OrderedDict[Key, None] = OrderedDict()  # shapes run once, the latest last
        self.failed: set[Key] = set()
        self.pool: Any = None
        self.captures = 0
        self.replays = 0

    def __call__(
        self,
        x: Sequence[torch.Tensor],
        t: torch.Tensor,
        cap_feats: Sequence[torch.Tensor],
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        key = self._key(x, t, cap_feats, kwargs)
        if key is None or key in self.failed:
            return self.forward(x, t, cap_feats, return_dict=return_dict, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # a shape's first forward runs as usual (and compiles)
                self.seen[key] = None
                while len(self.seen) > SEEN_LIMIT:
                    self.seen.popitem(last=False)
                return self.forward(x, t, cap_feats, return_dict=return_dict, **kwargs)
            result = self.forward(x, t, cap_feats, return_dict=False)
            self._capture(key, x, t, cap_feats)
            return self._wrap(list(result[0]), return_dict)
        self.graphs.move_to_end(key)
        for buffer, value in zip(entry.latents, x, strict=True):
            buffer.copy_(value)
        entry.timestep.copy_(t)
        for buffer, value in zip(entry.captions, cap_feats, strict=True):
            buffer.copy_(value)
        entry.graph.replay()
        self.replays += 1
        # The buffers are rewritten by the next replay: callers get their own copies.
        return self._wrap([output.clone() for output in entry.outputs], return_dict)

    @staticmethod
    def _key(x: Any, t: Any, cap_feats: Any, kwargs: dict[str, Any]) -> Key | None:
        """The shape of a call, or None for calls a graph does not cover (training, the omni
        mode's nested inputs, extra inputs such as ControlNet residuals, CPU tensors)."""
        if torch.is_grad_enabled() or not isinstance(t, torch.Tensor) or not t.is_cuda:
            return None
        if any(value is not None for name, value in kwargs.items() if name != "joint_attention_kwargs"):
            return None
        if kwargs.get("joint_attention_kwargs"):  # LoRA scales and the like
            return None
        tensors = [*x, *cap_feats]
        if not all(isinstance(item, torch.Tensor) and item.is_cuda for item in tensors):
            return None
        return (
            tuple((tuple(item.shape), item.dtype) for item in x),
            (tuple(t.shape), t.dtype),
            tuple((tuple(item.shape), item.dtype) for item in cap_feats),
            t.device,
        )

    def _capture(
        self, key: Key, x: Sequence[torch.Tensor], t: torch.Tensor, cap_feats: Sequence[torch.Tensor]
    ) -> None:
        latents = [item.clone() for item in x]
        timestep = t.clone()
        captions = [item.clone() for item in cap_feats]
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.forward(latents, timestep, captions, return_dict=False)[0]
        except Exception as exc:  # e.g. an operation that synchronizes with the host
            self.failed.add(key)
            logger.warning("no CUDA graph for transformer inputs %s: %s", key[:3], exc)
            return
        self.graphs[key] = _Graph(graph, latents, timestep, captions, list(outputs))
        self.captures += 1
        logger.info("captured a CUDA graph of the transformer for inputs %s", key[:3])
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    @staticmethod
    def _wrap(outputs: list[torch.Tensor], return_dict: bool) -> Any:
        if not return_dict:
            return (outputs,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=outputs)


def install(transformer: torch.nn.Module, max_graphs: int = 32) -> GraphedForward:
    """Route ``transformer``'s calls through CUDA graphs (``nn.Module.__call__`` calls the
    instance's ``forward``, which this replaces)."""
    graphed = GraphedForward(transformer.forward, max_graphs)
    transformer.forward = graphed
    return graphed
