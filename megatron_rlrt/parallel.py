"""Process groups: start ranks, initialise megatron-core's parallel_state, tear down.

Every entry point (trainer, tools, tests) goes through ``initialize`` so that the platform
adaptation, the backend choice and the seeding happen the same way everywhere. ``spawn``
lets a plain ``python tools/x.py --tensor-model-parallel-size 2`` start its own ranks on one
machine; under ``torchrun`` the ranks already exist and it simply calls the function.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rlrt.platform import Platform, setup_megatron


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes; data parallelism is whatever world size is left over."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def check_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline x context parallel size "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {self.model_parallel_size}"
            )


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 30) -> Platform:
    """Create the default process group (if needed) and megatron's model-parallel groups."""
    platform = setup_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if platform.is_cuda:  # before any CUDA work or NCCL communicator, also when the group exists already
        torch.cuda.set_device(platform.device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=platform.backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    layout.check_world_size(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
            context_parallel_size=layout.context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    # On CPU the tracker's fork() must not touch CUDA RNG state: the inference tracker is a
    # no-op fork, which is exact because our models run without dropout.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not platform.is_cuda)
    return platform


def destroy(barrier: bool = True) -> None:
    """Tear down megatron's groups and the process group (``barrier=False`` after an error,
    when other ranks may never arrive)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _spawn_entry(local_rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    fn(*args)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``world_size`` ranks.

    Under torchrun (RANK/WORLD_SIZE set) the ranks exist already: check the size and call
    ``fn`` here. Otherwise start ``world_size`` local processes on loopback. On CPU each
    rank gets one OpenMP thread, else two ranks on two cores oversubscribe badly.
    """
    if under_torchrun():
        found = int(os.environ["WORLD_SIZE"])
        if found != world_size:
            raise ValueError(f"launched with WORLD_SIZE={found} but this job needs {world_size} ranks")
        fn(*args)
        return
    if world_size == 1:  # in this process; leave the environment as it was afterwards
        env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            fn(*args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    mp.start_processes(_spawn_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
