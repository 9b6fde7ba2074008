"""WeightSnapshot: swapping other weights into a model and back, and the EMA teacher update."""

import pytest
import torch

from megatron_rlrt.trainer.weight_snapshot import WeightSnapshot


def _chunks():
    torch.manual_seed(0)
    return [torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))]


def _flat(chunks):
    return torch.cat([p.detach().flatten() for c in chunks for p in c.parameters()])


def test_swap_in_runs_the_body_with_the_snapshot_and_restores_the_model_bitwise():
    chunks = _chunks()
    start = _flat(chunks)
    snap = WeightSnapshot.of(chunks)
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.add_(torch.randn_like(p))
    trained = _flat(chunks)
    x = torch.randn(5, 4)
    with snap.swapped_in(chunks):
        assert torch.equal(_flat(chunks), start)
        y_snap = chunks[1](chunks[0](x))
    assert torch.equal(_flat(chunks), trained)
    with torch.no_grad():
        ref = torch.nn.functional.layer_norm(
            torch.nn.functional.linear(torch.nn.functional.linear(x, *_split(start)[:2]), *_split(start)[2:4]),
            (2,), *_split(start)[4:])
    torch.testing.assert_close(y_snap, ref, rtol=0, atol=1e-6)


def _split(flat):
    sizes = [(3, 4), (3,), (2, 3), (2,), (2,), (2,)]
    out, i = [], 0
    for s in sizes:
        n = torch.Size(s).numel()
        out.append(flat[i:i + n].view(s))
        i += n
    return out


def test_swap_restores_the_model_when_the_body_raises():
    chunks = _chunks()
    snap = WeightSnapshot.of(chunks)
    with torch.no_grad():
        chunks[0].weight.mul_(3)
    trained = _flat(chunks)
    with pytest.raises(RuntimeError, match="boom"):
        with snap.swapped_in(chunks):
            raise RuntimeError("boom")
    assert torch.equal(_flat(chunks), trained)


def test_ema_update_is_the_convex_mix_and_snapshots_are_independent_copies():
    chunks = _chunks()
    theta0 = _flat(chunks)
    teacher = WeightSnapshot.of(chunks)
    frozen = WeightSnapshot.of(chunks)
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.add_(1.0)
    teacher.ema_update(chunks, 0.25)
    got = torch.cat([t.flatten() for t in teacher.tensors])
    torch.testing.assert_close(got, 0.75 * theta0 + 0.25 * (theta0 + 1.0), rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([t.flatten() for t in frozen.tensors]), theta0)


def test_a_snapshot_of_another_model_is_refused():
    snap = WeightSnapshot.of([torch.nn.Linear(2, 2)])
    with pytest.raises(RuntimeError, match="snapshot holds 2 tensors, the model has 4"):
        with snap.swapped_in(_chunks()[:1] + [torch.nn.Linear(1, 1)]):
            pass
