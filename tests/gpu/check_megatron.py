"""GPU check of the Megatron side: Qwen3 on CUDA matches HF, and RL steps run on one GPU.

One short script for the accelerator machine (one H100/H200, no network). megatron-core is
not installed there: carry its wheel (pure Python) and psutil, see tests/gpu/README.md.

    python tests/gpu/check_megatron.py [--out DIR]

1. platform: CUDA found, nccl backend, whether Transformer Engine imports (spec used);
2. parity: a tiny real-architecture Qwen3 (tied, untied, GQA) built on CUDA with the local
   layer spec (and the TE spec if TE imports), float32, logits vs HF transformers on CUDA;
   max |diff| <= 1e-3 (TF32 off) and top-1 agreement 1.0;
3. RL: 2 steps of RLRT with the embedded HF engine on the same GPU (world size 1), bf16;
   finite loss and gradient norm, weights reach the engine (its version advances);
4. RNG: trainer/rng_state saved to a file and restored on CUDA (torch's CUDA generator and
   megatron's tracker) gives the same numbers again.

Writes check_megatron.json / .md to --out (default $OUT or tests/gpu/results/). Exit 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tests.gpu.common import Checks, rl_config, rl_model, single_rank_env, sum_prompts  # noqa: E402

CHECKS = Checks()


def check_platform():
    from megatron_rlrt.platform import detect

    p = detect()
    assert p.is_cuda and p.backend == "nccl", p
    return {"device": torch.cuda.get_device_name(), "transformer_engine": p.has_transformer_engine,
            "torch": torch.__version__}


def check_parity(tmp: str, use_te: bool):
    from transformers import AutoModelForCausalLM

    from megatron_rlrt import parallel
    from megatron_rlrt.models.forward import forward_logits
    from megatron_rlrt.models.hf_checkpoint import load_hf_weights
    from megatron_rlrt.models.megatron_checkpoint import load_hf_into_model
    from megatron_rlrt.models.qwen3 import Qwen3Spec, build_model, transformer_config
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from tests.conftest import TINY_CONFIGS as configs  # the same three architectures as the CPU tests

    single_rank_env()
    parallel.initialize(parallel.ParallelLayout(1, 1))
    out = {}
    tokens = torch.randint(0, 151_000, (3, 17), generator=torch.Generator().manual_seed(7))
    for name, cfg in configs.items():
        path = make_tiny_qwen3(os.path.join(tmp, f"{name}-{use_te}"), seed=1, **cfg)
        spec = Qwen3Spec.from_hf_dir(path)
        config = transformer_config(spec, params_dtype=torch.float32, perform_initialization=False, use_te=use_te)
        chunks = build_model(spec, config, use_te=use_te)
        load_hf_into_model(chunks, spec, load_hf_weights(path, spec))
        logits = forward_logits(chunks, tokens).float()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = hf(tokens.cuda()).logits.float()
        diff = (logits - ref).abs().max().item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        out[name] = {"max_abs_diff": diff, "top1": top1}
        assert diff <= 1e-3 and top1 == 1.0, (name, diff, top1)
    parallel.destroy()
    return out


def check_rl_steps(tmp: str):
    from megatron_rlrt import parallel
    from megatron_rlrt.trainer.trainer import Trainer

    model, data = rl_model(tmp, "rl-model"), sum_prompts(tmp)
    single_rank_env()
    cfg = rl_config(model, data, train_iters=2)
    trainer = Trainer(cfg)
    try:
        steps = [trainer.step(s) for s in range(2)]
        version = trainer.services.engine.weight_version
    finally:
        trainer.close()
    parallel.destroy()
    for m in steps:
        assert torch.isfinite(torch.tensor(m["actor/grad_norm"])) and m["actor/grad_norm"] > 0, m
    assert version == 2, version
    return [{k: round(v, 4) for k, v in m.items() if k.startswith(("perf/", "rlrt/", "actor/", "loss/"))}
            for m in steps]


def check_rng_round_trip(tmp: str):
    """trainer/rng_state on CUDA (docs/gpu_audit.md item 9): save the RNG state (CUDA generator and
    megatron's model-parallel tracker), draw, restore from the file, draw again: same numbers."""
    from megatron.core import tensor_parallel

    from megatron_rlrt import parallel
    from megatron_rlrt.trainer import rng_state

    single_rank_env()
    parallel.initialize(parallel.ParallelLayout(1, 1))

    def draw():
        plain = torch.randn(1000, device="cuda")
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.randn(1000, device="cuda")
        return torch.cat([plain, tracked]).cpu()

    path = os.path.join(tmp, "rng.safetensors")
    rng_state.save(path)
    first = draw()
    draw()  # move every generator on
    rng_state.load(path).apply()
    again = draw()
    parallel.destroy()
    assert torch.equal(first, again), "CUDA RNG state did not round-trip"
    return {"numbers": int(first.numel()), "equal": True}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "tests", "gpu", "results"),
                   help="directory for check_megatron.json / .md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for the GPU machine", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    CHECKS.record("platform", check_platform)
    te = CHECKS.checks["platform"].get("detail", {}).get("transformer_engine", False)
    with tempfile.TemporaryDirectory() as tmp:
        CHECKS.record("parity_local_spec", lambda: check_parity(tmp, use_te=False))
        if te:
            CHECKS.record("parity_te_spec", lambda: check_parity(tmp, use_te=True))
        else:
            CHECKS.not_run("parity_te_spec", "Transformer Engine not importable")
        CHECKS.record("rl_steps_bf16", lambda: check_rl_steps(tmp))
        CHECKS.record("rng_round_trip", lambda: check_rng_round_trip(tmp))
    return CHECKS.write(args.out, "check_megatron")


if __name__ == "__main__":
    sys.exit(main())
