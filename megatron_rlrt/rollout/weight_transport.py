"""How new weights reach the rollout servers: the trainer side of SGLang's three update paths.

The engine (``sglang_engine.SGLangEngine``) only speaks SGLang's HTTP protocol; a transport decides
where the tensors must be and how their bytes travel (slime's split: ``UpdateWeightFromTensor``
when colocated, ``UpdateWeightFromDistributed`` otherwise; ``slime/backends/megatron_utils/
update_weight/``):

- ``tensor`` (colocated): the servers map the trainer's own memory. Each bucket is flattened on
  the training device and pickled with torch's multiprocessing reductions (SGLang's
  ``MultiprocessingSerializer``): CUDA tensors travel as CUDA IPC handles, CPU tensors as
  shared-memory file names (the ``file_system`` sharing strategy), never as bytes. Every
  training rank of a node holds the bucket on its own GPU; the node's local rank 0 gathers the
  handles and sends engine TP rank ``i`` the handle from the rank on that engine's GPU ``i``
  (``NodePeers``; slime's ``UpdateWeightFromTensor``), so IPC never crosses a node or a GPU.
- ``distributed`` (disaggregated): the trainer joins a process group with every engine GPU
  (``/init_weights_update_group``; NCCL, gloo in CPU tests) and broadcasts each bucket.
- ``disk``: a HF safetensors snapshot on storage every server can read, then
  ``/update_weights_from_disk``.

Every update is one session: ``begin_weight_update`` -> buckets -> ``end_weight_update`` ->
weight version -> ``flush_cache`` -> every engine must report the new version (a session left
open by a failure is closed before the error propagates).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Iterable, Sequence

import torch

from megatron_rlrt.rollout.base import RolloutError

Bucket = list[tuple[str, torch.Tensor]]


def training_device() -> torch.device:
    """The device the trainer's parameters live on (this rank's GPU, else the CPU)."""
    from megatron_rlrt.platform import current_device

    return current_device()


class WeightTransport:
    """Moves HF-named full tensors into the servers behind one engine. ``device``: where the
    gathered tensors must be (the gather in ``weight_sync`` puts them there)."""

    name = ""
    device = torch.device("cpu")

    def update(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        engine.begin_update(version)
        try:
            self.send_buckets(engine, buckets, version)
        except BaseException:
            engine.abort_update()  # leave no session open: the next update must be able to begin
            raise
        engine.finish_update(version)

    def send_buckets(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        raise NotImplementedError

    def close(self, engine) -> None:
        """Free what the transport holds for ``engine`` (process groups)."""


class NodePeers:
    """The training ranks of one node, in local-rank order (= the GPU each one trains on), with a
    gloo group over them: every rank holds its own copy of each bucket on its own GPU and the
    node's local rank 0 (``leader``) gathers their handles (slime's ``_send_to_colocated_engine``:
    ``gather_object`` over the engine's ranks, then one request with a handle per TP rank)."""

    def __init__(self, group, ranks: Sequence[int]):
        self.group, self.ranks = group, list(ranks)
        self.leader = self.ranks[0]


class TensorTransport(WeightTransport):
    """Colocated: handles of the trainer's own memory on ``device`` (see module doc).

    With ``peers`` (set by ``rollout/fleet.py``), every training rank of the node flattens each
    bucket on its own GPU and the leader sends engine TP rank ``i`` the handle of the rank on that
    engine's GPU ``i``, as SGLang expects (``serialized_named_tensors[tp_rank]`` is deserialized
    on that TP rank's device): no GPU holds an extra copy per engine rank and every engine rank
    copies device-local. Without ``peers`` (one process drives the engine) that process's handle
    goes to every TP rank."""

    name = "tensor"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else training_device()
        self.peers: NodePeers | None = None

    def update(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        try:
            engine.begin_update(version)
        except BaseException as exc:
            self.exchange(buckets, None, error=f"begin_weight_update: {type(exc).__name__}: {exc}")
            raise
        try:
            self.send_buckets(engine, buckets, version)
        except BaseException:
            engine.abort_update()
            raise
        engine.finish_update(version)

    def send_buckets(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        self.exchange(buckets, lambda handles: engine.post_tensor_bucket(handles, version))

    def exchange(self, buckets: Iterable[Bucket], post=None, error: str | None = None) -> None:
        """Per bucket, on every rank of the node (or on the one sender without ``peers``): flatten it
        on this rank's device and serialize a handle; the leader gathers the node's handles
        (index = local rank) and calls ``post(handles)``; every rank keeps its buffer until the
        leader reports the servers answered. ``error``: the leader already failed (peers must not
        wait for buckets that will never be posted). Raises on every rank if any failed."""
        import torch.distributed as dist

        me = dist.get_rank() if self.peers is not None else None
        leader = self.peers is None or me == self.peers.leader
        for bucket in buckets:
            if not bucket:
                continue
            flat = serialized = None
            try:
                flat, serialized = self._serialize(bucket)
                mine = ("ok", serialized)
            except Exception as exc:  # noqa: BLE001 - reported to the leader, raised below
                mine = ("error", f"rank {me}: {type(exc).__name__}: {exc}")
            gathered = [mine]
            if self.peers is not None:
                gathered = [None] * len(self.peers.ranks) if leader else None
                dist.gather_object(mine, gathered, dst=self.peers.leader, group=self.peers.group)
            status = [None]
            if leader:
                failed = [m for kind, m in gathered if kind == "error"]
                status[0] = error or (failed[0] if failed else None)
                if status[0] is None and post is not None:
                    try:
                        post([m for _, m in gathered])
                    except Exception as exc:  # noqa: BLE001 - shared with the peers, then raised
                        status[0] = f"{type(exc).__name__}: {exc}"
                        mine = ("raise", exc)
            if self.peers is not None:
                dist.broadcast_object_list(status, src=self.peers.leader, group=self.peers.group)
            del flat, serialized  # the engines answered: they copied out of the shared buffers
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()  # release IPC blocks the engines have closed
            if mine[0] == "raise":
                raise mine[1]
            if status[0] is not None:
                raise RolloutError(f"tensor weight update failed: {status[0]}")

    def _serialize(self, bucket: Bucket):
        from megatron_rlrt.rollout import sglang_protocol as sp

        for name, tensor in bucket:
            if tensor.device != self.device:
                raise RolloutError(
                    f"weight_sync='tensor' hands the servers handles to the trainer's memory on {self.device}, "
                    f"but {name} is on {tensor.device}: gather onto the training device (or use "
                    f"weight_sync='distributed' / 'disk')")
        flat, metadata = sp.flatten_bucket(bucket, align=16)
        serialized = sp.serialize_flattened_bucket(flat, metadata)
        if flat.is_cuda:
            torch.cuda.synchronize()  # the engines read the buffer as soon as they get the handle
        return flat, serialized


class DistributedTransport(WeightTransport):
    """Disaggregated: one process group trainer (rank 0) + every engine GPU, joined once per
    engine; each bucket (one dtype) is announced over HTTP and broadcast as one flat buffer."""

    name = "distributed"

    def __init__(self, backend: str | None = None, master_address: str | None = None, sender_id: int = 0):
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = training_device() if self.backend == "nccl" else torch.device("cpu")
        self.master_address = master_address
        self.sender_id = int(sender_id)
        self.groups: dict[int, tuple] = {}  # id(engine) -> (process group, urls, group name)

    def group_name(self) -> str:
        from megatron_rlrt.rollout import sglang_protocol as sp

        return f"{sp.DEFAULT_GROUP_NAME}_sender{self.sender_id}"

    def connect(self, engine) -> None:
        """``/init_weights_update_group`` on every live engine while this process joins as rank 0."""
        if id(engine) in self.groups:
            return
        from megatron_rlrt.rollout.launch import find_free_port
        from megatron_rlrt.rollout.sglang_engine import init_weights_update_group, this_host_address

        urls = engine.live_urls()
        tps = [engine.engine_tp_size(u) for u in urls]
        world = 1 + sum(tps)
        address = self.master_address or this_host_address()
        port = find_free_port(40000 + 100 * self.sender_id, "0.0.0.0" if address != "127.0.0.1" else "127.0.0.1")
        offsets = [1 + sum(tps[:i]) for i in range(len(urls))]
        name = self.group_name()
        post = _in_thread(lambda: engine.post_init_weights_group(urls, address, port, offsets, world, name,
                                                                 self.backend))
        try:  # the engines block in their HTTP call until this process joins
            group = init_weights_update_group(address, port, 0, world, name, self.backend,
                                              timeout_s=engine.control_policy.request_timeout_s)
        finally:
            post.join()
        post.result()
        self.groups[id(engine)] = (group, urls, name)

    def update(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        self.connect(engine)
        super().update(engine, buckets, version)

    def send_buckets(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        import torch.distributed as dist

        from megatron_rlrt.rollout import sglang_protocol as sp

        self.connect(engine)
        group, urls, name = self.groups[id(engine)]
        for bucket in buckets:
            for part in sp.split_by_dtype(bucket) if bucket else []:
                flat, _ = sp.flatten_bucket(part, align=1)
                if self.backend == "nccl" and not flat.is_cuda:
                    flat = flat.to(self.device)
                post = _in_thread(lambda: engine.post_distributed_bucket(urls, part, name, version))
                try:
                    dist.broadcast(flat, src=0, group=group)
                finally:
                    post.join()
                post.result()

    def close(self, engine) -> None:
        entry = self.groups.pop(id(engine), None)
        if entry is None:
            return
        import torch.distributed as dist

        group, urls, name = entry
        try:
            engine.post_destroy_weights_group(urls, name)
        finally:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


class DiskTransport(WeightTransport):
    """A HF checkpoint directory every server can read (``weight_sync_dir``: shared storage when
    the servers are on other nodes); no begin/end session (SGLang needs none for disk loads)."""

    name = "disk"

    def update(self, engine, buckets: Iterable[Bucket], version: int) -> None:
        engine.update_from_snapshot(buckets, version)  # the server-engine base's disk update


TRANSPORTS = {"tensor": TensorTransport, "distributed": DistributedTransport, "disk": DiskTransport}


def resolve_weight_sync(kind: str, colocate: bool) -> str:
    """``auto`` -> ``tensor`` when colocated, ``distributed`` on CUDA otherwise, else ``disk``."""
    if kind not in ("auto", *TRANSPORTS):
        raise ValueError(f"weight_sync must be auto|{'|'.join(TRANSPORTS)}, not {kind!r}")
    if kind == "auto":
        return "tensor" if colocate else ("distributed" if torch.cuda.is_available() else "disk")
    return kind


def make_transport(kind: str, colocate: bool, **kwargs) -> WeightTransport:
    kind = resolve_weight_sync(kind, colocate)
    if kind == "distributed":
        return DistributedTransport(**kwargs)
    return TRANSPORTS[kind]()


# --- disk snapshots ---------------------------------------------------------------------------


SNAPSHOT_MARKER = "megatron_rlrt_weights.json"


def write_hf_snapshot(buckets: Iterable[Bucket], version: int, root: str, model_path: str | None = None) -> str:
    """Write HF-named tensors as ``root/v{version}`` (safetensors shards + the model's config
    files), atomically (a temporary directory renamed at the end). Returns the directory."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"v{version}")
    tmp = final + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    count, names = 0, set()
    for i, bucket in enumerate(buckets):
        tensors = {}
        for name, tensor in bucket:
            if name in names:
                raise RolloutError(f"weight {name} sent twice in one update")
            names.add(name)
            tensors[name] = tensor.detach().to("cpu").contiguous()
        if tensors:
            save_file(tensors, os.path.join(tmp, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
            count += 1
    if count == 0:
        raise RolloutError("weight update with no tensors")
    if model_path and os.path.isdir(model_path):
        for fname in ("config.json", "generation_config.json"):
            src = os.path.join(model_path, fname)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(tmp, fname))
    with open(os.path.join(tmp, SNAPSHOT_MARKER), "w") as f:
        json.dump({"version": version, "tensors": len(names)}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def drop_old_snapshots(keep: str) -> None:
    """Remove the other snapshots this code wrote next to ``keep``."""
    root = os.path.dirname(keep)
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if path != keep and entry.startswith("v") and os.path.isdir(path) and \
                os.path.exists(os.path.join(path, SNAPSHOT_MARKER)):
            shutil.rmtree(path, ignore_errors=True)


class _in_thread:
    """Run a blocking HTTP call beside a collective the servers wait on; re-raise its error."""

    def __init__(self, fn):
        self.box: dict = {}

        def run():
            try:
                self.box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self.box["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()

    def result(self):
        if "error" in self.box:
            raise self.box["error"]
        return self.box.get("value")

