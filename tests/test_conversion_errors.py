"""Bad input to the converters: a clear error naming what and where, no partial output."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_rlrt.fsutil import atomic_output_dir, temp_sibling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(hf_dir, out, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"),
                           "--hf-dir", str(hf_dir), "--output-dir", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture
def broken(tiny_model, tmp_path):
    """A fresh copy of the tiny checkpoint that each test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def _assert_clean_failure(result, out, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in: {result.stderr}"
    assert not os.path.exists(out) and not os.path.exists(temp_sibling(str(out)))


def test_missing_config(broken, tmp_path):
    os.remove(broken / "config.json")
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, str(broken / "config.json"), "missing")


def test_corrupt_config(broken, tmp_path):
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, "config.json", "not valid JSON")


def test_corrupt_safetensors(broken, tmp_path):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, str(path), "cannot read safetensors")


def test_missing_tensor(broken, tmp_path):
    from safetensors.torch import load_file, save_file

    path = broken / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, path)
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, "model.layers.1.self_attn.k_norm.weight", "missing")


def test_unsupported_architecture(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (broken / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, "unsupported architecture", "LlamaForCausalLM")


def test_moe_is_refused_clearly(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    (broken / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_clean_failure(convert(broken, out), out, "Qwen3-MoE", "not supported yet")


def test_tp_not_dividing_heads(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = convert(tiny_model, out, "--tensor-model-parallel-size", "3")
    _assert_clean_failure(result, out, "num_attention_heads=4 is not divisible by --tensor-model-parallel-size 3")


def test_pp_not_dividing_layers(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = convert(tiny_model, out, "--pipeline-model-parallel-size", "4")
    _assert_clean_failure(result, out, "num_hidden_layers=2 is not divisible by pipeline stages 4")


def test_output_dir_not_empty(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = convert(tiny_model, out)
    assert result.returncode == 2 and "not empty" in result.stderr and str(out) in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_failure_inside_atomic_output_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "half_written.bin"), "w").write("x")
            raise RuntimeError("disk full")
    assert not out.exists() and not os.path.exists(temp_sibling(str(out)))


def test_overwrite_keeps_old_checkpoint_until_new_one_is_complete(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.bin"), "w").write("new")
            raise RuntimeError("killed")
    assert (out / "old.bin").read_text() == "old"
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.bin"), "w").write("new")
    assert sorted(os.listdir(out)) == ["new.bin"]


def test_architecture_and_model_type_disagreeing_is_warned(tmp_path, capsys):
    """issue #13: architectures [LlamaForCausalLM] with model_type qwen3 converted silently."""
    from megatron_rlrt.models.qwen3 import Qwen3Spec

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0}
    Qwen3Spec.from_hf_config(cfg, "x/config.json")
    Qwen3Spec.from_hf_config(cfg, "x/config.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x/config.json: architectures ['LlamaForCausalLM'] and model_type 'qwen3' disagree" in err[0]
    Qwen3Spec.from_hf_config({**cfg, "architectures": ["Qwen3ForCausalLM"]}, "y/config.json")
    assert capsys.readouterr().err == ""


def test_compare_without_tokenizer_files_uses_fixed_ids(tiny_model, tmp_path):
    """issue #13: a HF dir with weights + config but no tokenizer died deep in F.embedding."""
    import shutil

    from megatron_rlrt.convert import compare, hf_to_megatron

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(tiny_model):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(tiny_model, name), bare / name)
    ckpt = tmp_path / "mc"
    hf_to_megatron(str(bare), str(ckpt), 1, 1)
    parity = compare(str(bare), str(ckpt), 1, 1)
    assert parity.tokens == 3 * 16 and parity.max_abs_logit_diff <= 1e-4 and parity.top1_agreement == 1.0
