"""FP8 rollouts: blockwise quantisation of weight updates (against transformers' FP8 quantiser),
server launch flags, and the checks of --rollout-quantization before any work."""

import json
import types

import pytest
import torch

from megatron_rlrt import precision
from megatron_rlrt.config import parse_config
from megatron_rlrt.rollout import fp8_weights
from megatron_rlrt.rollout.fp8_weights import dequantize_blockwise, quantize_blockwise, quantize_for_rollout
from megatron_rlrt.rollout.launch import EnginePlacement, sglang_server_command, vllm_server_command


def _transformers_fp8():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    quantizer = types.SimpleNamespace(quantization_config=types.SimpleNamespace(weight_block_size=(128, 128),
                                                                                scale_fmt=None))
    return Fp8Quantize(quantizer), Fp8Dequantize(quantizer)


def test_blockwise_quantisation_matches_transformers_fp8_checkpoint_format():
    torch.manual_seed(0)
    w = (torch.randn(256, 384) * 0.05).to(torch.bfloat16)
    w[:128, :128] = 0  # an all-zero block keeps scale 1 and zeros
    q, scale_inv = quantize_blockwise(w)
    quant, dequant = _transformers_fp8()
    ref = quant._quantize_one("l.weight", w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)
    assert torch.equal(q.float(), ref["l.weight"].float())
    torch.testing.assert_close(scale_inv, ref["l.weight_scale_inv"], rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize_blockwise(q, scale_inv), dequant._dequantize_one(q, scale_inv, torch.float32),
                               rtol=0, atol=0)
    assert scale_inv[0, 0] == 1 and not q[:128, :128].float().any()


def test_blockwise_quantisation_of_ragged_shapes_and_its_error():
    torch.manual_seed(1)
    w = torch.randn(200, 130)
    q, scale_inv = quantize_blockwise(w)
    assert q.shape == (200, 130) and scale_inv.shape == (2, 2)
    back = dequantize_blockwise(q, scale_inv)
    for (r0, r1), (c0, c1) in [((0, 128), (0, 128)), ((128, 200), (128, 130))]:
        block = w[r0:r1, c0:c1]
        amax = block.abs().max()
        assert scale_inv[r0 // 128, c0 // 128] == amax / 448  # amax maps to e4m3's largest value
        peak = block.abs().argmax()
        assert back[r0:r1, c0:c1].flatten()[peak] == block.flatten()[peak]  # 448 is exact in e4m3
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormal range of the block
    big = w.abs() > scale_inv.max() * 2**-6 * 4
    assert ((back - w).abs()[big] / w.abs()[big]).max() <= 2**-4


def test_only_the_layers_linear_weights_become_fp8():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"]
    names += [f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    named = [(n, torch.randn(256, 128, dtype=torch.bfloat16) if n.endswith("proj.weight") or "embed" in n or "lm_head" in n
              else torch.ones(128, dtype=torch.bfloat16)) for n in names]
    out = dict(quantize_for_rollout(named))
    linear = [n for n in names if n.endswith("proj.weight")]
    assert len(linear) == 7 and set(out) == set(names) | {n + "_scale_inv" for n in linear}
    for n in names:
        assert out[n].dtype == (torch.float8_e4m3fn if n in linear else torch.bfloat16), n
    assert all(out[n + "_scale_inv"].shape == (2, 1) for n in linear)
    buckets = list(fp8_weights.quantize_buckets([named[:6], named[6:]]))
    assert [len(b) for b in buckets] == [6 + 1, 6 + 6]


def test_servers_are_launched_with_fp8_quantization():
    pl = EnginePlacement(0, 0, 2, "127.0.0.1", 30000, 31000)
    cmd = sglang_server_command("/ckpt/Qwen3-8B-FP8", pl, python="python", quantization="fp8")
    assert cmd[cmd.index("--quantization") + 1] == "fp8" and cmd[cmd.index("--model-path") + 1] == "/ckpt/Qwen3-8B-FP8"
    cmd = vllm_server_command("/ckpt/Qwen3-8B-FP8", pl, python="python", quantization="fp8")
    assert cmd[cmd.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in sglang_server_command("/ckpt", pl, python="python")
    from megatron_rlrt.rollout.registry import _server_kwargs

    cfg = parse_config(["--rollout-engine", "sglang", "--rollout-quantization", "fp8", "--rollout-model-path", "/fp8"])
    kwargs = _server_kwargs(cfg, "/bf16")
    assert kwargs["quantization"] == "fp8" and kwargs["model_path"] == "/fp8"
    assert _server_kwargs(parse_config([]), "/bf16")["model_path"] == "/bf16"


def _checkpoint(tmp_path, name, quantization_config=None):
    d = tmp_path / name
    d.mkdir()
    cfg = {"model_type": "qwen3"}
    if quantization_config:
        cfg["quantization_config"] = quantization_config
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_rollout_quantization_is_checked_before_any_work(tmp_path):
    fp8_dir = _checkpoint(tmp_path, "fp8", fp8_weights.QUANTIZATION_CONFIG)
    bf16_dir = _checkpoint(tmp_path, "bf16")
    base = ["--rollout-engine", "sglang", "--rollout-quantization", "fp8"]
    assert precision.check_rollout(parse_config(base + ["--rollout-model-path", fp8_dir])) == []
    assert precision.check_rollout(parse_config(base + ["--rollout-urls", "http://h:30000"])) == []
    cases = [(["--rollout-engine", "hf", "--rollout-quantization", "fp8", "--rollout-model-path", fp8_dir],
              "needs --rollout-engine sglang or vllm"),
             (base, "needs --rollout-model-path: a blockwise-FP8 checkpoint"),
             (base + ["--rollout-model-path", bf16_dir], "quantization_config is None"),
             (base + ["--rollout-model-path", str(tmp_path / "missing")], "no config.json there")]
    for flags, error in cases:
        problems = precision.check_rollout(parse_config(flags))
        assert len(problems) == 1 and error in problems[0], (flags, problems)
    with pytest.warns(UserWarning, match="without truncated importance sampling"):
        precision.check_rollout(parse_config(base + ["--rollout-model-path", fp8_dir, "--tis-clip", "0"]))
    assert parse_config(base).tis_clip == 2.0  # TIS is on by default


# --- the FP8 recipes and the FP8 checkpoint tool ---------------------------------------------------


@pytest.mark.parametrize("name,recipe,good,bad", [("qwen3_8b_base_fp8_h100", "blockwise", "H100", "L40S"),
                                                  ("qwen3_8b_base_fp8_b200", "mxfp8", "B200", "H100")])
def test_fp8_recipes_are_the_bf16_recipe_plus_fp8(tmp_path, name, recipe, good, bad):
    import os

    from megatron_rlrt.config import load_recipe
    from tests.test_precision import B200, H100, L40S

    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "recipes")
    base, fp8 = (load_recipe(os.path.join(recipes, f"{n}.yaml")) for n in ("qwen3_8b_base", name))
    assert {k: v for k, v in fp8.items() if k in base and k != "save"} == {k: v for k, v in base.items() if k != "save"}
    assert set(fp8) - set(base) == {"fp8_format", "fp8_recipe", "fp8_param_gather", "logprob_precision",
                                    "rollout_quantization", "rollout_model_path"}
    assert fp8["fp8_recipe"] == recipe and fp8["rollout_quantization"] == "fp8"
    fp8_dir = _checkpoint(tmp_path, "fp8", fp8_weights.QUANTIZATION_CONFIG)
    cfg = parse_config(["--config", os.path.join(recipes, f"{name}.yaml"), "--rollout-model-path", fp8_dir])
    machines = {"H100": H100, "B200": B200, "L40S": L40S}
    assert precision.check(cfg, machines[good]) == []
    problems = precision.check(cfg, machines[bad])
    assert len(problems) == 1 and f"--fp8-recipe {recipe} needs" in problems[0]


def test_quantize_fp8_checkpoint_tool(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.qwen3 import Qwen3Spec
    from tools.quantize_fp8_checkpoint import main

    out = tmp_path / "fp8"
    assert main(["--hf-dir", tiny_model, "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fp8_weights.QUANTIZATION_CONFIG
    assert (out / "tokenizer.json").is_file()
    src = load_hf_weights(tiny_model, Qwen3Spec.from_hf_dir(tiny_model))
    written = load_file(str(out / "model.safetensors"))
    for name in src:
        if fp8_weights.is_fp8_weight(name):
            q, s = written[name], written[name + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn
            assert torch.equal(dequantize_blockwise(q, s), dequantize_blockwise(*quantize_blockwise(src[name])))
        else:
            assert torch.equal(written[name], src[name]), name
    assert precision.check_rollout(parse_config(["--rollout-engine", "vllm", "--rollout-quantization", "fp8",
                                                 "--rollout-model-path", str(out)])) == []
    assert main(["--hf-dir", str(out), "--output-dir", str(tmp_path / "again")]) == 2  # already quantized
