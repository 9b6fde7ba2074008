"""FP8 flags: Megatron-LM's names reach megatron-core's TransformerConfig; every hardware rule is
checked before any work against an injected machine description; packs honour the FP8 divisors."""

import dataclasses

import pytest
import torch

from megatron_rlrt import precision
from megatron_rlrt.config import Config, ConfigError, build_parser, parse_config
from megatron_rlrt.models.qwen3 import Qwen3Spec, transformer_config
from megatron_rlrt.packing import PackRow, pack_rows, pad_multiple
from megatron_rlrt.precision import Capability, Fp8Options

H100 = Capability(True, (9, 0), "NVIDIA H100 80GB HBM3", "2.8.0")
B200 = Capability(True, (10, 0), "NVIDIA B200", "2.8.0")
L40S = Capability(True, (8, 9), "NVIDIA L40S", "2.8.0")
A100 = Capability(True, (8, 0), "NVIDIA A100-SXM4-80GB", "2.8.0")
H100_NO_TE = Capability(True, (9, 0), "NVIDIA H100 80GB HBM3", None)
H100_OLD_TE = Capability(True, (9, 0), "NVIDIA H100 80GB HBM3", "2.2.0")
CPU = Capability()

FP8_FLAGS = ["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--fp8-margin", "1",
             "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max", "--no-fp8-wgrad",
             "--fp8-param-gather", "--use-distributed-optimizer", "--first-last-layers-bf16",
             "--num-layers-at-start-in-bf16", "2", "--num-layers-at-end-in-bf16", "0"]
SPEC = Qwen3Spec(256, 64, 128, 4, 4, 2, 16, 1e-6, 1e6, 512, True, "bfloat16")


def _megatron_lm_flag(field: dataclasses.Field) -> str:
    """The flag Megatron-LM's ArgumentGroupFactory generates for a TransformerConfig field."""
    if field.name == "fp8_param":  # arguments.py: --fp8-param-gather, copied into fp8_param
        return "--fp8-param-gather"
    names = field.metadata.get("argparse_meta", {}).get("arg_names")
    if names:
        return names[0]
    flag = field.name.replace("_", "-")
    return f"--no-{flag}" if field.default is True else f"--{flag}"


def test_every_fp8_flag_is_megatron_lms_and_reaches_transformer_config():
    cfg = parse_config(FP8_FLAGS)
    opts = Fp8Options.from_config(cfg)
    tc = transformer_config(SPEC, params_dtype=torch.bfloat16, fp8=opts)
    kwargs = opts.transformer_config_kwargs()
    assert kwargs == dict(fp8="hybrid", fp8_recipe="blockwise", fp8_margin=1, fp8_amax_history_len=1024,
                          fp8_amax_compute_algo="max", fp8_wgrad=False, fp8_param=True, first_last_layers_bf16=True,
                          num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=0)
    assert {k: getattr(tc, k) for k in kwargs} == kwargs
    # the flag names are the ones Megatron-LM derives from these TransformerConfig fields
    from megatron.core.transformer import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    help_text = build_parser().format_help()
    for name in kwargs:
        flag = _megatron_lm_flag(fields[name])
        assert flag in FP8_FLAGS and flag in help_text, flag


def test_without_fp8_the_config_is_unchanged():
    plain = transformer_config(SPEC, params_dtype=torch.bfloat16)
    same = transformer_config(SPEC, params_dtype=torch.bfloat16, fp8=Fp8Options.from_config(parse_config([])))
    assert plain.fp8 is None and same.fp8 is None and plain.fp8_param is False
    assert Fp8Options().transformer_config_kwargs() == {} and Fp8Options().pad_divisor() == 1


def test_fp8_on_cpu_fails_before_any_work_with_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "p.jsonl").write_text("{}\n")
    cfg = parse_config(["--hf-checkpoint", str(tmp_path / "ckpt"), "--prompt-data", str(tmp_path / "p.jsonl"),
                        "--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()  # this machine: no CUDA, no Transformer Engine
    msg = str(err.value)  # one problem: one line
    assert "\n" not in msg and "no CUDA device" in msg and "--fp8-format e4m3" in msg, msg
    cfg.validate(capability=H100)  # the same flags pass on an H100 with TE


@pytest.mark.parametrize("recipe,machine,error", [
    ("delayed", L40S, None), ("tensorwise", H100, None), ("blockwise", H100, None), ("mxfp8", B200, None),
    ("blockwise", B200, None),
    ("mxfp8", H100, "needs Blackwell (sm_100) or newer; NVIDIA H100 80GB HBM3 is sm_90"),
    ("blockwise", L40S, "needs Hopper (sm_90) or newer; NVIDIA L40S is sm_89"),
    ("delayed", A100, "needs Ada/Hopper (sm_89) or newer; NVIDIA A100-SXM4-80GB is sm_80"),
    ("tensorwise", H100_NO_TE, "needs Transformer Engine (transformer_engine.pytorch does not import"),
    ("blockwise", H100_OLD_TE, "needs Transformer Engine >= 2.3.0.dev0 (installed: 2.2.0)"),
    ("delayed", CPU, "no CUDA device"),
])
def test_hardware_rules_against_an_injected_machine(recipe, machine, error):
    problems = precision.check(parse_config(["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", recipe]), machine)
    if error is None:
        assert problems == []
    else:
        assert len(problems) == 1 and error in problems[0] and f"--fp8-recipe {recipe}" in problems[0], problems


@pytest.mark.parametrize("flags,error", [
    (["--fp8-param-gather"], "--fp8-param-gather needs --use-distributed-optimizer"),
    (["--first-last-layers-bf16", "--fp8-recipe", "delayed"], "--first-last-layers-bf16 does not work with --fp8-"
                                                               "recipe delayed"),
    (["--fp8-param-gather", "--use-distributed-optimizer", "--logprob-precision", "bf16"],
     "--logprob-precision bf16 cannot be used with --fp8-param-gather"),
    (["--fp8-amax-history-len", "0"], "--fp8-amax-history-len 0 must be >= 1"),
])
def test_invalid_fp8_combinations_name_their_flags(flags, error):
    problems = precision.check(parse_config(["--bf16", "--fp8-format", "e4m3"] + flags), H100)
    assert any(error in p for p in problems), problems


def test_fp8_only_flags_without_fp8_and_fp8_without_bf16():
    for flags in (["--fp8-param-gather", "--use-distributed-optimizer"], ["--first-last-layers-bf16"],
                  ["--logprob-precision", "bf16"]):
        problems = precision.check(parse_config(flags), CPU)  # no FP8: the machine does not matter
        assert len(problems) == 1 and "applies to FP8 training only" in problems[0], problems
    assert precision.check(parse_config([]), CPU) == []
    problems = precision.check(parse_config(["--fp8-format", "e4m3"]), H100)
    assert len(problems) == 1 and "needs --bf16" in problems[0]


def test_bf16_layer_counts_checked_like_megatron_core():
    from megatron.core.transformer import TransformerConfig

    opts = Fp8Options.from_config(parse_config(FP8_FLAGS + ["--num-layers-at-end-in-bf16", "3"]))
    with pytest.raises(ValueError, match=r"--num-layers-at-end-in-bf16 3: must be between 0 and the layers per "
                                         r"pipeline stage \(2 = 4 layers / --pipeline-model-parallel-size 2\)"):
        transformer_config(SPEC, params_dtype=torch.bfloat16, fp8=opts, pipeline_model_parallel_size=2)
    # megatron-core refuses the same values (the independent reference for the rule)
    kwargs = dict(num_layers=4, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=2,
                  pipeline_dtype=torch.bfloat16, bf16=True, params_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_layers_at_end_in_bf16"):
        TransformerConfig(**kwargs, **opts.transformer_config_kwargs())
    TransformerConfig(**kwargs, **{**opts.transformer_config_kwargs(), "num_layers_at_end_in_bf16": 2})


def test_pad_divisors_match_megatron_core_and_the_peers():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in ("delayed", "tensorwise", "mxfp8"):  # megatron-core's own GEMM alignment
        assert Fp8Options("e4m3", recipe).pad_divisor() == get_fp8_align_size(Fp8Recipe(recipe))
    assert Fp8Options("e4m3", "blockwise").pad_divisor() == 128  # NeMo-RL / verl pad blockwise to 128
    assert precision.sequence_shards(4, True, 1) == 4 and precision.sequence_shards(4, False, 1) == 1
    assert precision.sequence_shards(2, True, 2) == 8  # TP x 2 CP chunks
    assert precision.fp8_pad_multiple(Fp8Options("e4m3", "mxfp8"), shards=4) == 128
    assert precision.fp8_pad_multiple(Fp8Options(), shards=4) == 1
    assert pad_multiple(4, 6, 1) == 12 and pad_multiple() == 1 and pad_multiple(0, 8) == 8


@pytest.mark.parametrize("recipe,tp,sp,multiple", [("tensorwise", 1, False, 16), ("mxfp8", 2, True, 64),
                                                   ("blockwise", 4, True, 512)])
def test_packs_are_padded_so_every_shard_fits_the_fp8_gemm(recipe, tp, sp, multiple):
    opts = Fp8Options("hybrid", recipe)
    shards = precision.sequence_shards(tp, sp)
    m = pad_multiple(tp if sp else 1, precision.fp8_pad_multiple(opts, shards))
    assert m == multiple
    rows = [PackRow([1, 2, 3], [4, 5, 6, 7], "student", 0), PackRow([9, 1, 2, 3, 8], [4, 5, 6, 7], "teacher", 0),
            PackRow([1], [2] * 37, "student", 1)]
    packed = pack_rows(rows, m)
    n = packed.num_tokens
    assert n % m == 0 and (n // shards) % opts.pad_divisor() == 0 and n - sum(map(len, rows)) < m
    assert int(packed.label_mask.sum()) == 4 + 4 + 37  # the padding is never a label
    assert packed.cu_seqlens[-2].item() == sum(map(len, rows))  # padding is its own trailing segment


# --- the null teacher: identical student and teacher rows in the packed no-grad pass -------------


def _null_teacher(tiny_model, tmp_path, dtype):
    import json

    from megatron_rlrt import parallel
    from tests.helpers.precision_helpers import null_teacher_rank

    out = tmp_path / f"null_{dtype}.json"
    parallel.spawn(null_teacher_rank, 1, tiny_model, dtype, str(out), 8, (1, 4), ("same", "context"))
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_null_teacher_gives_dt_exactly_zero_in_the_packed_forward(tiny_model, tmp_path, dtype):
    """Teacher context empty => teacher rows equal student rows => D_t = 0 exactly (and A_t = A)
    in the packed no-grad pass, in one pack per sample and four samples per pack alike; a real
    context moves D_t (else this test could not tell a broken teacher path from a working one)."""
    r = _null_teacher(tiny_model, tmp_path, dtype)
    # Identical rows through identical kernels: every row of a pack gets its own RoPE positions and
    # its own attention (THD: TE on GPU, PackedCoreAttention on CPU). With megatron's masked local
    # attention and pack-wide RoPE positions it was only rounding-close (benchmarks/RESULTS.md).
    for mbs in ("1", "4"):
        same, context = r[f"same/{mbs}"], r[f"context/{mbs}"]
        assert same["tokens"] == context["tokens"] > 200
        assert same["max_abs"] == 0 and same["exact_zero_fraction"] == 1 and same["max_abs_At_minus_A"] == 0, same
        assert context["mean_abs"] > 1e-2 and context["max_abs"] > 0.1, context


def test_logprob_precision_bf16_turns_fp8_off_for_the_pass_only():
    opts = Fp8Options.from_config(parse_config(["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]))
    tc = transformer_config(SPEC, params_dtype=torch.bfloat16, fp8=opts)
    with precision.logprob_precision(tc, "train"):
        assert tc.fp8 == "hybrid"
    with pytest.raises(RuntimeError, match="inside"):
        with precision.logprob_precision(tc, "bf16"):
            assert tc.fp8 is None and tc.fp8_recipe == "tensorwise"
            raise RuntimeError("inside")
    assert tc.fp8 == "hybrid"  # restored, also after an error
    tc.fp8_param = True
    with pytest.raises(ValueError, match="--fp8-param-gather"):
        with precision.logprob_precision(tc, "bf16"):
            pass
    plain = transformer_config(SPEC, params_dtype=torch.bfloat16)
    with precision.logprob_precision(plain, "bf16"):  # no FP8: nothing to switch
        assert plain.fp8 is None


@pytest.mark.parametrize("flags,multiple", [
    ([], 1), (["--tensor-model-parallel-size", "4", "--sequence-parallel"], 4),
    (["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"], 16),
    (["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     256),
    (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--context-parallel-size", "2"], 128),
])
def test_the_trainers_pack_multiple(flags, multiple):
    cfg = parse_config(flags)
    assert precision.pack_multiple(cfg) == multiple
    tp = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
    per_rank = multiple // (tp * cfg.context_parallel_size)  # tokens one rank's GEMMs see per multiple
    assert per_rank % Fp8Options.from_config(cfg).pad_divisor() == 0
