"""The rollout engines as every training rank sees them: placement, lifecycle, weight updates.

The trainer owns the servers' memory and weights; per RL step it calls (slime's ``train.py`` order):

    fleet.refresh(chunks, spec, version)  # collective: resume weights -> update -> resume KV cache
    fleet.engine.generate(...)            # rank 0, over every server of every node
    fleet.release()                       # rank 0: weights and KV cache released (colocated)
    ... train ...

Placement:

- colocated server engines (``--colocate``, no ``--rollout-urls``): every node's local rank 0
  launches the servers for its node's GPUs; the addresses are gathered over torch.distributed;
  rank 0 dispatches prompts over all of them. The servers span the node's training GPUs
  (``LOCAL_WORLD_SIZE``, ``colocated_num_gpus``). Each node's servers get the new weights from
  that node's ranks: with the tensor transport every rank of the node holds each bucket on its
  own GPU and engine TP rank i gets the handle of the rank on its GPU i (``NodePeers``: local
  rank 0 gathers the handles and posts); no IPC crosses a node or a GPU. The servers start
  released: the first ``refresh`` resumes them.
- everything else (disaggregated servers given by URL or behind a router, the in-process ``hf``
  engine): one engine on rank 0, which also sends the weights.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rlrt.rollout.base import KV_CACHE, MEMORY_TAGS, WEIGHTS, RolloutError, iter_weight_buckets


def node_layout() -> tuple[int, int, int]:
    """(node index, local rank, ranks per node) from torchrun's environment."""
    rank = dist.get_rank()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    node = int(os.environ.get("GROUP_RANK", rank // local_world))
    return node, local_rank, local_world


def colocated_num_gpus(gpus_per_engine: int, local_world_size: int | None = None,
                       visible_gpus: int | None = -1) -> int:
    """How many GPUs of this node the colocated servers span: the node's training GPUs, i.e.
    torchrun's ``LOCAL_WORLD_SIZE`` (one rank per GPU), not every visible GPU (a job on 4 of 8
    GPUs must not put servers on the other 4). ``visible_gpus``: GPUs this process sees
    (default: ``torch.cuda.device_count()``, None on a CPU, where each rank stands for a GPU).
    Raises ValueError naming the flags when the layout cannot work."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if visible_gpus == -1:
        visible_gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    gpus_per_engine = int(gpus_per_engine)
    if local_world_size < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world_size}: expected the number of training ranks on this node")
    if visible_gpus is not None and visible_gpus < local_world_size:
        raise ValueError(
            f"--colocate: this node runs LOCAL_WORLD_SIZE={local_world_size} training ranks (torchrun --nproc-per-node) "
            f"but only {visible_gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES): colocation needs one GPU per rank")
    if gpus_per_engine < 1 or local_world_size % gpus_per_engine:
        raise ValueError(
            f"--colocate: the servers share this node's {local_world_size} training GPUs (LOCAL_WORLD_SIZE, torchrun "
            f"--nproc-per-node); --rollout-num-gpus-per-engine {gpus_per_engine} must divide {local_world_size} (each "
            f"server's TP ranks sit on the GPUs of training ranks of this node)")
    return local_world_size


def weight_device(engine) -> torch.device:
    """Where the gathered tensors must be for this engine's transport (CPU for engines that take
    HF tensors themselves: hf, vllm)."""
    transport = getattr(engine, "transport", None)
    return transport.device if transport is not None else torch.device("cpu")


class RolloutFleet:
    """See the module docstring. ``engine``: rank 0's engine over every server (None elsewhere);
    ``local``: the engine this rank sends weights to (None on ranks that send none); ``peer``: on
    the other ranks of a node whose servers take tensor handles, this rank's own
    ``TensorTransport`` (every rank hands its own GPU's copy to the engine ranks on that GPU);
    ``receivers``: the ranks the weights are gathered onto."""

    def __init__(self, engine, local, senders: Sequence[int], colocated: bool, urls_by_node: list[list[str]],
                 bucket_bytes: int, local_urls: Sequence[str] = (), peer=None, receivers: Sequence[int] | None = None,
                 quantization: str | None = None):
        self.engine, self.local, self.senders = engine, local, list(senders)
        self.peer, self.quantization = peer, quantization
        self.receivers = sorted(receivers) if receivers is not None else list(self.senders)
        self.local_urls = list(local_urls)  # the servers this rank sends weights to, as others reach them
        self.colocated, self.urls_by_node, self.bucket_bytes = colocated, urls_by_node, int(bucket_bytes)

    @classmethod
    def create(cls, cfg, hf_dir: str, tokenizer, factory) -> "RolloutFleet":
        """Collective. ``factory(cfg, hf_dir, tokenizer)`` builds one engine (the registry's)."""
        from megatron_rlrt.rollout.registry import SERVER_ENGINES

        rank = dist.get_rank()
        per_node = cfg.colocate and not cfg.rollout_urls and cfg.rollout_engine in SERVER_ENGINES
        if not per_node:
            engine, error = (_build(factory, cfg, hf_dir, tokenizer) if rank == 0 else (None, None))
            if engine is not None and cfg.colocate:
                error = _release_all(engine)
            _agree(error, "creating the rollout engine")
            urls = list(getattr(engine, "urls", [])) if rank == 0 else []
            return cls(engine, engine, [0], cfg.colocate, [urls] if rank == 0 else [], cfg.update_weight_buffer_size,
                       urls)
        node, local_rank, local_world = node_layout()
        multi_node = dist.get_world_size() > local_world
        local, error, urls = None, None, None
        if local_rank == 0:
            node_cfg = replace(cfg, rollout_host="0.0.0.0") if multi_node and not cfg.rollout_host else cfg
            local, error = _build(factory, node_cfg, hf_dir, tokenizer)
            if local is not None:
                urls = [_reachable(u) if multi_node else u for u in local.urls]
                error = _release_all(local)
        _agree(error, f"launching the rollout servers of node {node}")
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (node, urls))
        by_node = {n: u for n, u in gathered if u is not None}
        urls_by_node = [by_node[n] for n in sorted(by_node)]
        senders = [r for r, (n, u) in enumerate(gathered) if u is not None]
        peers, receivers = _node_peers(node, local_rank, local)
        peer = None
        if peers is not None:
            if local is not None:
                local.transport.peers = peers
            else:
                from megatron_rlrt.rollout.weight_transport import TensorTransport

                peer = TensorTransport()
                peer.peers = peers
        engine = None
        if rank == 0:
            if len(urls_by_node) == 1:
                engine = local
            else:  # one client over every node's servers: generation and memory control
                every = ",".join(u for urls in urls_by_node for u in urls)
                engine, error = _build(factory, replace(cfg, rollout_urls=every), hf_dir, tokenizer)
        _agree(error if rank == 0 and len(urls_by_node) > 1 else None, "connecting to every node's servers")
        return cls(engine, local, senders, True, urls_by_node, cfg.update_weight_buffer_size, urls or [], peer,
                   sorted(set(senders) | set(receivers)), cfg.rollout_quantization)

    # --- the step -------------------------------------------------------------------------

    def refresh(self, chunks, spec, version: int) -> float:
        """Collective: every sender resumes its servers' weights, loads the trainer's current
        weights into them and resumes their KV cache; returns the seconds taken. Any sender's
        failure raises on every rank."""
        import time

        from megatron_rlrt.rollout.weight_sync import gather_hf_weights

        t0 = time.perf_counter()
        sender = dist.get_rank() in self.senders
        error = None
        if sender:
            try:
                self.local.resume_memory([WEIGHTS])
            except Exception as exc:  # noqa: BLE001 - agreed on below, after the collective
                error = f"{type(exc).__name__}: {exc}"
        device = weight_device(self.local) if sender else (self.peer.device if self.peer else torch.device("cpu"))
        stream = gather_hf_weights(chunks, spec, self.receivers, device)
        buckets = iter_weight_buckets(stream, self.bucket_bytes)
        if sender and error is None:
            try:
                self.local.update_weights(buckets, version)
                self.local.resume_memory([KV_CACHE])
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        elif sender and getattr(getattr(self.local, "transport", None), "peers", None) is not None:
            try:  # the node's other ranks wait for this rank's per-bucket answers: tell them
                self.local.transport.exchange(buckets, None, error=error)
            except Exception:  # noqa: BLE001 - the error is already recorded
                pass
        elif self.peer is not None:
            try:
                self.peer.exchange(self._outgoing(buckets))
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        for _ in stream:  # the rest of the collective, whatever happened above
            pass
        _agree(error, f"updating the rollout servers to weight version {version}")
        if self.engine is not None and self.engine is not self.local:
            self.engine.note_version(version)
        return time.perf_counter() - t0

    def _outgoing(self, buckets):
        """The buckets as the servers hold the weights (what the sender's engine does to its own)."""
        if self.quantization != "fp8":
            return buckets
        from megatron_rlrt.rollout.fp8_weights import quantize_buckets

        return quantize_buckets(buckets)

    def release(self) -> None:
        """Rank 0, after generating: free the servers' weights and KV cache for training."""
        if self.colocated and self.engine is not None:
            self.engine.release_memory(list(MEMORY_TAGS))

    def shutdown(self) -> None:
        for engine in {id(e): e for e in (self.engine, self.local) if e is not None}.values():
            engine.shutdown()


def _node_peers(node: int, local_rank: int, local):
    """Collective. For every node whose local rank 0 drives servers through the tensor transport:
    a gloo group over that node's ranks in local-rank order (rank i trains on GPU i). Returns
    (this rank's NodePeers or None, every rank that must receive the gathered weights)."""
    from megatron_rlrt.rollout.weight_transport import NodePeers, TensorTransport

    wide = isinstance(getattr(local, "transport", None), TensorTransport)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (node, local_rank, wide))
    mine, receivers = None, []
    for n in sorted({e[0] for e in every}):
        ranks = sorted((r for r, e in enumerate(every) if e[0] == n), key=lambda r: every[r][1])
        if not any(every[r][2] for r in ranks):
            continue
        local_ranks = [every[r][1] for r in ranks]
        if local_ranks != list(range(len(ranks))):
            raise RolloutError(f"node {n}: local ranks {local_ranks}, expected 0..{len(ranks) - 1} (one per GPU)")
        group = dist.new_group(ranks, backend="gloo")  # every rank creates every group, in the same order
        receivers += ranks
        if node == n:
            mine = NodePeers(group, ranks)
    return mine, receivers


def _release_all(engine) -> str | None:
    """Colocated servers start holding their memory; the trainer takes it until the first refresh."""
    try:
        engine.release_memory(list(MEMORY_TAGS))
        return None
    except Exception as exc:  # noqa: BLE001 - agreed on by the caller
        return f"{type(exc).__name__}: {exc}"


def _build(factory, cfg, hf_dir, tokenizer):
    try:
        return factory(cfg, hf_dir, tokenizer), None
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it
        return None, f"{type(exc).__name__}: {exc}"


def _agree(error: str | None, what: str) -> None:
    """Raise the same RolloutError on every rank if any rank failed ``what``; collective."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise RolloutError(f"{what} failed on rank(s) " + "; ".join(f"{r}: {e}" for r, e in failed))


def _reachable(url: str) -> str:
    """A URL other nodes can reach (this node's address instead of the loopback)."""
    from megatron_rlrt.rollout.sglang_engine import this_host_address

    return url.replace("://127.0.0.1:", f"://{this_host_address()}:")
