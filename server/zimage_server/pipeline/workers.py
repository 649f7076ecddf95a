"""The pipeline's workers: one runner per GPU, or one sequence-parallel runner over them all."""

from __future__ import annotations

from zimage_server.core.config import Settings
from zimage_server.pipeline.runner import PipelineRunner, worker_devices
from zimage_server.pipeline.sequence_parallel import SequenceParallelRunner


def make_runners(settings: Settings) -> list[PipelineRunner]:
    """One runner per worker device (sequence parallel: this process's rank-0 runner)."""
    if settings.sequence_parallel > 1:
        return [SequenceParallelRunner(settings, worker_devices(settings)[0])]
    devices = worker_devices(settings)
    runners = [PipelineRunner(settings, device) for device in devices]
    for runner in runners[1:]:  # the first worker loads and saves the shared artifacts for all
        runner.shares_artifacts = False
    for runner in runners:
        runner.workers = len(runners)
    return runners
