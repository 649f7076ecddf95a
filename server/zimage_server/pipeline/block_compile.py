"""Regional compile of repeated blocks with their varying dimensions dynamic from the first
call: the Z-Image transformer block, and the text encoder's decoder layer.

One block class serves the noise refiner, the caption refiner and the 30 main layers, and one
compiled function serves every instance. Left to itself, dynamo traces each dimension static
first and again dynamic when it changes (the caption's length, the joined length, the batch),
per role, on every process start: 12 traces in the warm-up, each of them paid again by every
new replica even when the compiled kernels come from shared artifacts. Marking the sequence
dimension dynamic before the first call, and the batch dimension once it is above one (a
dimension of size one is always traced apart), leaves one trace per role and kind of batch:
one image or several, padded (with an attention mask) or not.

The refiners' rotary tables arrive as slices of longer ones: dynamo guards on a view's base,
and a caption's table, cut from one padded for the longest caption, has a batch stride that
no longer follows its length; either would trace again. They are copied to tensors of their
own first (a few megabytes, in the four refiner blocks only).

The text encoder's decoder layer is marked the same way (the prompt's length, the batch): two
traces, one prompt or several, instead of three (static, then its length dynamic, then its
batch).

Every compiled part answers to a ``CompileGate``: until the gate opens, calls run the part's
own, uncompiled ``forward``, except on a thread that is building the compiled path (its
warm-up). So a server can answer requests while it compiles, and switch to the compiled code
once it is traced, in one step for all parts.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marking:
    """Which dimensions of a block's inputs are marked dynamic before a call: ``sequence``,
    by input name, the dimensions that follow the sequence (a tuple of tensors, such as a
    rotary cos and sin, has each of its tensors marked alike); dimension 0 of every tensor
    input once it is above one (the batch). ``own_copy``: inputs copied to a tensor of their
    own first where they are a view or not packed."""

    sequence: Mapping[str, tuple[int, ...]]
    own_copy: frozenset[str] = frozenset()
    # Inputs whose dimension 0 is always the request's batch, whatever its size: with
    # ``unbacked_batch`` it is an unbacked size from the first call, so one image and several
    # share a trace (a backed size of one is always traced apart).
    batch: frozenset[str] = frozenset()
    unbacked_batch: bool = False


# The Z-Image transformer block: image tokens, caption tokens or both along dimension 1.
TRANSFORMER_BLOCK = Marking(
    sequence={"x": (1,), "attn_mask": (1,), "freqs_cis": (1,), "noise_mask": (1,)},
    own_copy=frozenset({"freqs_cis"}),
    batch=frozenset(
        {"x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask", "adaln_noisy", "adaln_clean"}
    ),
)
# A transformers decoder layer (the text encoder's): the prompt's tokens along dimension 1, and
# along both last dimensions of a 4D attention mask (batch, 1, query, key).
DECODER_LAYER = Marking(
    sequence={
        "hidden_states": (1,),
        "position_ids": (1,),
        "position_embeddings": (1,),
        "attention_mask": (2, 3),
    }
)


def _packed(value: torch.Tensor) -> bool:
    """Whether every stride is the product of the sizes after it (``is_contiguous`` also
    accepts any stride on a dimension of size one, which dynamo still guards on)."""
    expected = 1
    for size, stride in zip(reversed(value.shape), reversed(value.stride()), strict=True):
        if stride != expected:
            return False
        expected *= size
    return True


def _mark(marking: Marking, name: str, value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_mark(marking, name, item) for item in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if name in marking.own_copy and (value._base is not None or not _packed(value)):
        value = value.clone(memory_format=torch.contiguous_format)
    if marking.unbacked_batch and name in marking.batch:
        torch._dynamo.decorators.mark_unbacked(value, 0)
    elif value.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(value, 0)
    for dim in marking.sequence.get(name, ()):
        if 0 < dim < value.dim():
            torch._dynamo.maybe_mark_dynamic(value, dim)
    return value


def _unmark_batch(value: Any) -> None:
    if isinstance(value, tuple):
        for item in value:
            _unmark_batch(item)
    elif isinstance(value, torch.Tensor):
        getattr(value, "_dynamo_unbacked_indices", set()).discard(0)


class CompileGate:
    """Whether calls run the compiled code: everywhere once ``opened``; before that, only on a
    thread inside ``building()`` (the warm-up that traces and compiles the parts)."""

    def __init__(self, opened: bool = True) -> None:
        self.opened = opened
        self._local = threading.local()

    def open(self) -> None:
        self.opened = True

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        self._local.building = True
        try:
            yield
        finally:
            self._local.building = False

    @property
    def compiled_here(self) -> bool:
        """Whether a call on this thread runs the compiled code."""
        return self.opened or getattr(self._local, "building", False)


# The gate of parts compiled without one: always open.
OPEN = CompileGate()


class GatedForward:
    """Stands in for a module's ``forward``: the compiled one where the gate says so, else the
    module's own."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], gate: CompileGate) -> None:
        self.compiled = compiled
        self.eager = eager
        self.gate = gate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate.compiled_here:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


class OneAtATime:
    """Stands in for a module's ``forward`` that two threads must not run at once while
    ``gate`` is shut (one serving, one compiling). transformers' models keep the outputs they
    capture (the hidden states the pipeline reads) in process-wide state whenever
    ``torch.compiler.is_compiling()`` says so, and PyTorch says so in every thread while any
    one of them compiles: a text encoder run beside its own compile mixes the two calls'
    hidden states, and dynamo fails building the layer's guards."""

    def __init__(self, forward: Callable[..., Any], gate: CompileGate) -> None:
        self.forward = forward
        self.gate = gate
        self.lock = threading.Lock()
        self._waited = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate.opened:
            return self.forward(*args, **kwargs)
        started = time.perf_counter()
        with self.lock:
            self._waited.seconds = self.waited() + time.perf_counter() - started
            return self.forward(*args, **kwargs)

    def waited(self, reset: bool = False) -> float:
        """Seconds this thread's calls waited for the other thread's; ``reset`` starts again."""
        seconds: float = getattr(self._waited, "seconds", 0.0)
        if reset:
            self._waited.seconds = 0.0
        return seconds


def compile_module(module: torch.nn.Module, gate: CompileGate = OPEN, **options: Any) -> None:
    """Compile ``module``'s ``forward`` whole, behind ``gate``."""
    module.forward = GatedForward(torch.compile(module.forward, **options), module.forward, gate)


class SharedMarking:
    """The marking every block compiled together uses; one block finding the unbacked batch
    untraceable turns it off for all of them."""

    def __init__(self, marking: Marking) -> None:
        self.marking = marking


class DynamicBlockForward:
    """Stands in for a block's ``forward``: marks the inputs' dimensions, then calls the
    compiled forward (the block's own, or whatever wraps it, such as sequence-parallel hooks);
    where ``gate`` keeps the compiled code shut, the forward it wraps, unmarked.

    Where dynamo cannot trace the block with an unbacked batch (an operation that asks whether
    the batch is one, as PyTorch 2.11's CUDA attention does), the block is traced per batch
    size instead, with a warning, rather than failing the request."""

    def __init__(
        self,
        compiled: Callable[..., Any],
        names: list[str],
        shared: SharedMarking,
        eager: Callable[..., Any] | None = None,
        gate: CompileGate = OPEN,
    ) -> None:
        self.compiled = compiled
        self.names = names
        self.shared = shared
        self.eager = eager
        self.gate = gate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager is not None and not self.gate.compiled_here:
            return self.eager(*args, **kwargs)
        marking = self.shared.marking
        marked = tuple(_mark(marking, name, value) for name, value in zip(self.names, args, strict=False))
        args = marked + args[len(marked) :]
        kwargs = {name: _mark(marking, name, value) for name, value in kwargs.items()}
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.UserError as error:
            if not marking.unbacked_batch or "data-dependent" not in str(error):
                raise
            logger.warning(
                "compile_batch_unbacked: torch %s cannot trace this block with an unbacked batch "
                "(%s); tracing it per batch size instead",
                torch.__version__,
                str(error).splitlines()[0][:200],
            )
            self.shared.marking = replace(marking, unbacked_batch=False)
            for value in (*args, *kwargs.values()):
                _unmark_batch(value)
            return self(*args, **kwargs)


def compile_blocks(
    model: torch.nn.Module,
    names: Iterable[str],
    marking: Marking,
    gate: CompileGate = OPEN,
    **options: Any,
) -> int:
    """Compile the ``forward`` of every module of ``model`` whose class is one of ``names``
    through ``DynamicBlockForward``, behind ``gate``; returns how many. The modules' hooks stay
    outside the compiled code."""
    wanted = set(names)
    shared = SharedMarking(marking)
    count = 0
    for module in model.modules():
        if type(module).__name__ not in wanted or isinstance(module.forward, DynamicBlockForward):
            continue
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        forward = module.forward
        compiled = torch.compile(forward, **options)
        module.forward = DynamicBlockForward(compiled, parameters, shared, forward, gate)
        count += 1
    return count
