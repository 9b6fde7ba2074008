"""gather_hf_weights to several receivers (every node's sender in a colocated job): at PP=2 with a
receiver on each stage, each gets the full HF state dict, equal to the checkpoint it was loaded from."""

import os

import torch
from safetensors.torch import load_file

from megatron_rlrt import parallel
from tests.helpers.fleet_helpers import gather_rank


def test_every_receiver_gets_every_stage(tiny_model, tmp_path):
    parallel.spawn(gather_rank, 2, tiny_model, 2, [0, 1], str(tmp_path))
    start = {}
    for f in os.listdir(tiny_model):
        if f.endswith(".safetensors"):
            start.update(load_file(os.path.join(tiny_model, f)))
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert sorted(got) == sorted(start)
        for name, t in start.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (rank, name)
