"""Sequence parallel: several GPUs make each image together, for latency.

diffusers' context parallelism does the work (``ModelMixin.enable_parallelism`` with a
``ContextParallelConfig``): Ulysses attention, where each GPU holds a slice of the sequence,
exchanges it for a slice of the heads before attention (all-to-all) and back after. Z-Image
ships no plan of where to split, so ``context_parallel_plan`` gives one: the joined image and
caption sequence is split before the first main block (with its rotary table at every block)
and gathered after the final layer. The refiners before it (two blocks on the image tokens,
two on the caption) run whole on every GPU. Z-Image has 30 heads: 2, 3, 5 or 6 GPUs split them
evenly; for other degrees diffusers' ``ulysses_anything`` splits unevenly.

One process per GPU. This process, rank 0, serves HTTP and runs the engine; it starts the
other ranks (``python -m zimage_server.pipeline.sequence_parallel``) once the model is on local disk,
and sends each batch to them on their standard input before running it itself. Every rank
runs the same pipeline call with the same seeds; only rank 0 decodes images. A rank that
exits makes the server's liveness fail. A rank whose standard input closes (rank 0 gone)
exits.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any
from unittest import mock

import torch

from zimage_server.core.config import Settings
from zimage_server.core.errors import APIError
from zimage_server.pipeline.runner import BatchSpec, PipelineRunner, pick_device

logger = logging.getLogger(__name__)

# How long a collective may wait for the other ranks: a cold start compiles for minutes on
# each GPU, and the ranks meet inside the warm-up's first forward.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=45)
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)
# Settings a follower has no use for (it never serves HTTP nor downloads).
_NOT_FOR_FOLLOWERS = {"api_keys", "api_keys_file", "hf_token"}


def context_parallel_plan(transformer: Any) -> dict[str, Any]:
    """Where diffusers splits and gathers Z-Image's sequence across the ranks."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    # The rotary table is complex, or (cos, sin) pairs with one more dimension once the server
    # swaps in its real-arithmetic rotation: the sequence is dimension 1 in both.
    plan: dict[str, Any] = {
        "layers.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "layers.*": {"freqs_cis": ContextParallelInput(split_dim=1, expected_dims=None, split_output=False)},
    }
    for name in transformer.all_final_layer:
        plan[f"all_final_layer.{name}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


def enable(transformer: Any, degree: int) -> None:
    """Turn on Ulysses attention over ``degree`` ranks (the process group must exist)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    processors = [module.attention.processor for module in transformer.layers if hasattr(module, "attention")]
    backend = processors[0]._attention_backend if processors else None
    if backend is not None and not _AttentionBackendRegistry._is_context_parallel_available(
        AttentionBackendName(backend)
    ):
        logger.warning("attention backend %s cannot run sequence parallel; using native", backend)
        transformer.set_attention_backend("native")
    heads = transformer.config.n_heads
    config = ContextParallelConfig(ulysses_degree=degree, ulysses_anything=heads % degree != 0)
    # diffusers picks a rank's device as rank % accelerator count, which divides by zero where
    # there is no accelerator; on the CPU (gloo) it is given one device to pick.
    patch = (
        mock.patch("torch.accelerator.device_count", return_value=1)
        if not torch.cuda.is_available()
        else contextlib.nullcontext()
    )
    with patch:
        transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(transformer))
    # The refiners see the whole (unsplit) image or caption sequence on every rank.
    for refiner in (transformer.noise_refiner, transformer.context_refiner):
        for block in refiner:
            block.attention.processor._parallel_config = None


def init_group(settings: Settings, rank: int, device: torch.device) -> None:
    import torch.distributed as dist

    # The ranks are processes of one pod on one node: their sockets stay on loopback (gloo's
    # and NCCL's bootstrap would otherwise take the interface the host name resolves to).
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, "lo")
    # The ranks meet right after start-up, before any of them loads the model: a rank that
    # never comes (it failed to start) ends the start-up in minutes, not at the collective timeout.
    store = dist.TCPStore(  # type: ignore[attr-defined]  # public, re-exported from torch._C
        "127.0.0.1",
        settings.parallel_port,
        settings.sequence_parallel,
        is_master=rank == 0,
        timeout=RENDEZVOUS_TIMEOUT,
        wait_for_workers=True,
    )
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=rank,
        world_size=settings.sequence_parallel,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def rank_device(settings: Settings, rank: int) -> torch.device:
    base = pick_device(settings.device)
    return torch.device("cuda", rank) if base.type == "cuda" else base


class _Rank(PipelineRunner):
    """Any rank: its transformer runs Ulysses attention with the others before it compiles."""

    def before_compile(self, pipe: Any) -> None:
        enable(pipe.transformer, self.settings.sequence_parallel)


class SequenceParallelRunner(_Rank):
    """Rank 0: the server's one runner, driving the other ranks."""

    def __init__(self, settings: Settings, device: torch.device | None = None) -> None:
        super().__init__(settings, device)
        self.followers: list[subprocess.Popen[str]] = []

    def before_load(self) -> None:
        assert self.model_path is not None
        fields = self.settings.model_dump(mode="json", exclude=_NOT_FOR_FOLLOWERS)
        fields["model"] = str(self.model_path)  # on local disk now: no rank downloads it again
        for rank in range(1, self.settings.sequence_parallel):
            follower = subprocess.Popen(
                [sys.executable, "-m", "zimage_server.pipeline.sequence_parallel", str(rank)],
                stdin=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert follower.stdin is not None
            follower.stdin.write(json.dumps(fields) + "\n")
            follower.stdin.flush()
            self.followers.append(follower)
        logger.info(
            "sequence parallel over %d ranks: started ranks 1-%d (pids %s)",
            self.settings.sequence_parallel,
            self.settings.sequence_parallel - 1,
            ", ".join(str(follower.pid) for follower in self.followers),
        )
        init_group(self.settings, 0, self.device)

    @property
    def alive(self) -> bool:
        return all(follower.poll() is None for follower in self.followers)

    def follower_pids(self) -> list[int]:
        return [follower.pid for follower in self.followers]

    def generate(self, spec: BatchSpec, observer: Any = None) -> Any:
        dead = [rank for rank, follower in enumerate(self.followers, 1) if follower.poll() is not None]
        if dead:
            raise APIError(
                503,
                f"sequence-parallel rank {dead[0]} has exited; this replica is restarting, retry on another",
                type="server_error",
                code="rank_exited",
            )
        line = json.dumps(
            {
                "prompts": list(spec.prompts),
                "seeds": list(spec.seeds),
                "width": spec.width,
                "height": spec.height,
                "steps": spec.steps,
                "adapters": [list(pair) for pair in spec.adapters],
            }
        )
        try:
            for follower in self.followers:
                assert follower.stdin is not None
                follower.stdin.write(line + "\n")
                follower.stdin.flush()
            return super().generate(spec, observer)
        except BaseException:
            # The other ranks may be waiting in a collective this rank never reaches: no later
            # batch could pair with theirs. Ending them fails liveness, and the kubelet restarts
            # the replica; the queue's requests are answered 503 meanwhile.
            logger.exception("a sequence-parallel batch failed on rank 0; ending the other ranks")
            self._end_followers(timeout=0)
            raise

    def _end_followers(self, timeout: float) -> None:
        """Close the other ranks' input, and kill those that have not exited after ``timeout``.
        They stay listed: a dead rank keeps this runner from being alive."""
        for follower in self.followers:
            with contextlib.suppress(OSError, ValueError):
                assert follower.stdin is not None
                follower.stdin.close()
        for follower in self.followers:
            try:
                follower.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()

    def stop(self) -> None:
        """End the other ranks: their input closes, and they are killed if they do not exit."""
        self._end_followers(timeout=10)
        self.followers = []
        import torch.distributed as dist

        if dist.is_initialized():  # a later server in this process starts a group of its own
            dist.destroy_process_group()


def follow(rank: int, lines: IO[str]) -> None:
    """Ranks 1 and up: load the pipeline as rank 0 does, then run each batch it sends."""
    settings = Settings(**json.loads(lines.readline()))
    logging.getLogger().setLevel(settings.log_level.upper())  # as rank 0 logs
    device = rank_device(settings, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runner = _FollowerRunner(settings, device, rank)
    runner.load()
    for line in lines:
        batch = json.loads(line)
        spec = BatchSpec(
            batch["prompts"],
            batch["seeds"],
            batch["width"],
            batch["height"],
            batch["steps"],
            adapters=tuple((name, scale) for name, scale in batch["adapters"]),
        )
        try:
            runner.run_pipe(spec, None, "latent")  # rank 0 decodes the images
        except Exception:
            # Rank 0 may be waiting in a collective this rank never reaches: the replica cannot
            # go on, and this rank's exit fails its liveness.
            logger.exception("rank %d failed a batch; exiting so that the replica restarts", rank)
            sys.exit(1)


class _FollowerRunner(_Rank):
    def __init__(self, settings: Settings, device: torch.device, rank: int) -> None:
        super().__init__(settings, device)
        self.rank = rank
        self.shares_artifacts = False  # rank 0 loads and saves them

    def resolve_model(self) -> Path:
        return Path(self.settings.model)

    def before_load(self) -> None:
        init_group(self.settings, self.rank, self.device)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {sys.argv[1]} %(name)s: %(message)s"
    )
    follow(int(sys.argv[1]), sys.stdin)


if __name__ == "__main__":
    main()
