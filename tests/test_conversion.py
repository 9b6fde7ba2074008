"""HF <-> Megatron conversion: bit-exact round trip, resharding on load, CLI behaviour."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from megatron_rlrt.convert import compare, hf_to_megatron, megatron_to_hf

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def tp2pp2_checkpoint(tiny_models, tmp_path_factory):
    """The GQA/untied model converted by 4 ranks at TP=2 x PP=2."""
    out = str(tmp_path_factory.mktemp("conv") / "gqa_tp2pp2")
    hf_to_megatron(tiny_models["gqa"], out, tp=2, pp=2)
    return out


def test_round_trip_tp2pp2_is_bit_identical(tiny_models, tp2pp2_checkpoint, tmp_path):
    meta = json.loads(open(os.path.join(tp2pp2_checkpoint, "metadata.json")).read())
    assert (meta["saved_tensor_model_parallel_size"], meta["saved_pipeline_model_parallel_size"]) == (2, 2)
    back = str(tmp_path / "hf")
    megatron_to_hf(tp2pp2_checkpoint, back)
    src, dst = _tensors(tiny_models["gqa"]), _tensors(back)
    assert sorted(src) == sorted(dst)
    for name in src:
        assert src[name].dtype == dst[name].dtype, name
        assert src[name].equal(dst[name]), f"{name} changed in the round trip"
    # the result is a complete checkpoint that transformers and the tokenizer load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(back)
    assert AutoTokenizer.from_pretrained(back).chat_template


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_same_logits(tiny_models, tmp_path):
    ckpt = str(tmp_path / "tied_tp2")
    hf_to_megatron(tiny_models["tied"], ckpt, tp=2, pp=1)
    parity = compare(tiny_models["tied"], ckpt, tp=1, pp=1)
    assert parity.max_abs_logit_diff <= 1e-4 and parity.top1_agreement == 1.0


def _cli(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_compare_cli_passes_on_good_and_fails_on_wrong_model(tiny_models, tp2pp2_checkpoint, tmp_path):
    good = _cli("compare_hf_megatron.py", "--hf-dir", tiny_models["gqa"], "--megatron-dir", tp2pp2_checkpoint,
                "--tensor-model-parallel-size", "2")
    assert good.returncode == 0, good.stderr[-2000:]
    assert "PASS" in good.stdout and "max |logit diff|" in good.stdout
    # same architecture, different weights: must fail with exit code 1
    other = str(tmp_path / "other")
    from tools.make_tiny_qwen3 import make_tiny_qwen3
    from tests.conftest import TINY_CONFIGS

    make_tiny_qwen3(other, seed=99, **TINY_CONFIGS["gqa"])
    bad = _cli("compare_hf_megatron.py", "--hf-dir", other, "--megatron-dir", tp2pp2_checkpoint)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
