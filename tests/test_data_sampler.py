"""Deterministic shuffling and exact resume."""

import numpy as np
import pytest

from megatron_rlrt.data import PromptLoader, ResumableSampler


def test_same_seed_same_order_and_epochs_reshuffle():
    a, b = ResumableSampler(10, seed=3), ResumableSampler(10, seed=3)
    first = a.next_indices(10)
    assert first == b.next_indices(10)
    assert sorted(first) == list(range(10))  # an epoch is a permutation
    second = a.next_indices(10)
    assert sorted(second) == list(range(10)) and second != first and a.epoch == 2
    assert ResumableSampler(10, seed=4).next_indices(10) != first
    # independent reference: the documented rule
    assert first == list(np.random.default_rng([3, 0]).permutation(10))


@pytest.mark.parametrize("consumed", [0, 3, 7, 10, 13])
def test_resume_continues_exactly(consumed):
    uninterrupted = ResumableSampler(7, seed=11).next_indices(30)
    s = ResumableSampler(7, seed=11)
    head = s.next_indices(consumed)
    state = dict(s.state_dict())  # what a checkpoint stores
    resumed = ResumableSampler(7, seed=11)
    resumed.load_state_dict(state)
    assert head + resumed.next_indices(30 - consumed) == uninterrupted


def test_loader_batches_cross_epochs_and_resume():
    data = [f"p{i}" for i in range(5)]
    ref = PromptLoader(data, seed=1)
    expected = [ref.next_batch(3) for _ in range(4)]
    loader = PromptLoader(data, seed=1)
    got = [loader.next_batch(3), loader.next_batch(3)]
    state = loader.state_dict()
    loader2 = PromptLoader(data, seed=1)
    loader2.load_state_dict(state)
    got += [loader2.next_batch(3), loader2.next_batch(3)]
    assert got == expected and loader2.epoch == 2


def test_no_shuffle_is_in_order():
    assert ResumableSampler(4, shuffle=False).next_indices(6) == [0, 1, 2, 3, 0, 1]


def test_state_from_another_dataset_or_seed_is_refused():
    s = ResumableSampler(5, seed=1)
    with pytest.raises(ValueError, match="num_samples=6 .* this run has num_samples=5"):
        s.load_state_dict({"seed": 1, "epoch": 0, "position": 0, "num_samples": 6, "shuffle": True})
    with pytest.raises(ValueError, match="seed=2"):
        s.load_state_dict({"seed": 2, "epoch": 0, "position": 0, "num_samples": 5, "shuffle": True})
    with pytest.raises(ValueError, match="invalid sampler state"):
        s.load_state_dict({"seed": 1, "epoch": 0, "position": 9, "num_samples": 5, "shuffle": True})
