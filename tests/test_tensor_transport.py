"""TensorTransport.exchange across the ranks of a 'node' (gloo, 2 processes on CPU): the leader
posts one handle per rank in local-rank order, each from that rank's own memory; a failure on any
rank (a peer's bad tensor, the servers refusing the post) raises on every rank at that bucket
instead of leaving the others waiting in the next gather."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_rlrt import parallel

pytestmark = pytest.mark.slow  # spawns ranks: `-m "not slow"` skips it


def _bucket(rank: int, k: int):
    # rank-specific values (a real update has the same weights on every rank): shows whose memory
    # each entry maps
    return [("a", torch.full((4,), float(k + 10 * rank))), ("b", torch.arange(3, dtype=torch.float32) + k)]


def exchange_rank(case: str, out_dir: str) -> None:
    import base64
    import io
    import pickle

    import torch.distributed as dist

    from megatron_rlrt.rollout.weight_transport import NodePeers, TensorTransport

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    transport = TensorTransport("cpu")
    transport.peers = NodePeers(dist.new_group([0, 1], backend="gloo"), [0, 1])
    posted: list = []

    def post(handles):
        if case == "post-fails" and len(posted) == 1:
            raise RuntimeError("server refused bucket 1")
        opened = []
        for h in handles:  # what SGLang's TP rank i does with entry i
            data = pickle.Unpickler(io.BytesIO(base64.b64decode(h))).load()
            opened.append(data["flattened_tensor"].view(torch.float32).tolist())
        posted.append(opened)

    buckets = [_bucket(rank, k) for k in range(3)]
    if case == "peer-fails" and rank == 1:
        buckets[1] = [("a", torch.empty(4, device="meta"))]  # not on the transport's device
    error = None
    try:
        transport.exchange(iter(buckets), post if rank == 0 else None)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"error": error, "posted": posted, "pid": os.getpid()}, f)
    dist.barrier()
    dist.destroy_process_group()


def _run(case, tmp_path):
    parallel.spawn(exchange_rank, 2, case, str(tmp_path))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_bucket_posts_one_handle_per_rank_in_rank_order(tmp_path):
    r0, r1 = _run("ok", tmp_path)
    assert r0["error"] is None and r1["error"] is None
    assert len(r0["posted"]) == 3
    for k, opened in enumerate(r0["posted"]):
        assert [entry[:4] for entry in opened] == [[float(k)] * 4, [float(k + 10)] * 4]  # entry i: rank i's memory


@pytest.mark.parametrize("case,expected", [("peer-fails", "but a is on meta"),
                                           ("post-fails", "server refused bucket 1")])
def test_a_failure_on_any_rank_raises_on_every_rank(tmp_path, case, expected):
    r0, r1 = _run(case, tmp_path)
    assert expected in r0["error"] and expected in r1["error"], (r0["error"], r1["error"])
    assert len(r0["posted"]) == 1  # bucket 0 went out; nothing after the failed bucket
