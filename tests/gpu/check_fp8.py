"""GPU check of FP8 (Transformer Engine): the RLRT no-grad pass and RL steps in FP8 vs bf16.

For a GPU image WITH Transformer Engine. Without TE (the usual image here) it records every
check as "not run" and exits 0; without CUDA it exits 2.

    python tests/gpu/check_fp8.py [--out DIR] [--recipes blockwise tensorwise]

1. platform: device, compute capability, TE version; which --fp8-recipe values this machine
   accepts (``precision.check`` against the detected ``Capability``; the CPU suite tests the
   same rules against injected machines);
2. null teacher, per recipe and for bf16: D_t = log P_S - log P_T of the trainer's packed no-grad
   pass when teacher rows equal student rows (expected: exactly 0 with TE's THD attention, whose
   RoPE and attention are per row), the D_t of a real 16-token context, and the pass time
   (3 repeats after a warm-up) as a ratio to bf16;
3. RL steps, per recipe and for bf16: 2 RLRT steps of the trainer (tiny Qwen3, hidden 256,
   4 layers, HF engine on the same GPU): finite loss and gradient norm, step time vs bf16.

Writes check_fp8.json / .md to --out (default $OUT or tests/gpu/results/). Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tests.gpu.common import Checks, rl_config, rl_model, single_rank_env, sum_prompts  # noqa: E402

CHECKS = Checks()
ALL_RECIPES = ("tensorwise", "blockwise", "mxfp8", "delayed")


def _flags_cfg(recipe: str | None):
    from megatron_rlrt.config import parse_config

    return parse_config(["--bf16"] + (["--fp8-format", "e4m3", "--fp8-recipe", recipe] if recipe else []))


def check_platform(wanted):
    from megatron_rlrt import precision

    cap = precision.Capability.detect()
    accepted = {r: precision.check(_flags_cfg(r), cap) for r in wanted}
    return {"device": cap.device_name, "capability": cap.compute_capability, "transformer_engine": cap.te_version,
            "torch": torch.__version__, "recipes_accepted": [r for r, p in accepted.items() if not p],
            "recipes_refused": {r: p for r, p in accepted.items() if p}}


def _tiny_model(tmp: str) -> str:
    return rl_model(tmp, "fp8-model")


def check_null_teacher(tmp: str, recipe: str | None, baseline: dict | None):
    from tests.helpers.precision_helpers import null_teacher_rank

    single_rank_env()
    out = os.path.join(tmp, f"null_{recipe or 'bf16'}.json")
    fp8 = dict(fp8_format="e4m3", fp8_recipe=recipe) if recipe else None
    null_teacher_rank(_tiny_model(tmp), "bfloat16", out, 16, (8,), ("same", "context"), repeats=3, fp8_flags=fp8)
    with open(out) as f:
        r = json.load(f)
    same, ctx = r["same/8"], r["context/8"]
    detail = {"null_max_abs_Dt": same["max_abs"], "null_mean_abs_Dt": same["mean_abs"],
              "null_exact_zero_fraction": same["exact_zero_fraction"], "context_mean_abs_Dt": ctx["mean_abs"],
              "pass_seconds": same["seconds"]}
    if baseline:
        detail["pass_time_vs_bf16"] = same["seconds"] / baseline["pass_seconds"]
        detail["context_Dt_mean_abs_diff_vs_bf16"] = abs(ctx["mean_abs"] - baseline["context_mean_abs_Dt"])
    assert same["max_abs"] < 0.05 and ctx["mean_abs"] > 10 * same["mean_abs"], detail
    return detail


def check_rl_steps(tmp: str, recipe: str | None, baseline: dict | None):
    from megatron_rlrt import parallel
    from megatron_rlrt.trainer.trainer import Trainer

    data = sum_prompts(tmp)
    single_rank_env()
    fp8 = ["--fp8-format", "e4m3", "--fp8-recipe", recipe] if recipe else []
    cfg = rl_config(_tiny_model(tmp), data, train_iters=3, extra=["--seed", "7", *fp8])
    trainer = Trainer(cfg)
    try:
        steps = [trainer.step(s) for s in range(3)]
    finally:
        trainer.close()
    parallel.destroy()
    for m in steps:
        assert torch.isfinite(torch.tensor(m["actor/grad_norm"])) and m["actor/grad_norm"] > 0, m
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k.startswith("loss/")), m
    timed = steps[1:]  # step 0 warms up (and fills the FP8 amax history)
    keys = sorted({k for m in timed for k in m if k.startswith("perf/") and k.endswith(("_time_s", "_sync_s"))})
    detail = {"losses": [{k: round(v, 5) for k, v in m.items() if k.startswith("loss/")} for m in steps],
              "grad_norms": [round(m["actor/grad_norm"], 5) for m in steps],
              "perf": {k: round(sum(m.get(k, 0.0) for m in timed) / len(timed), 4) for k in keys}}
    if baseline:
        detail["perf_vs_bf16"] = {k: round(v / baseline["perf"][k], 3) for k, v in detail["perf"].items()
                                  if baseline["perf"].get(k)}
    return detail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "tests", "gpu", "results"),
                   help="directory for check_fp8.json / .md")
    p.add_argument("--recipes", nargs="+", default=list(ALL_RECIPES), choices=ALL_RECIPES,
                   help="FP8 recipes to try (those this GPU refuses are recorded as refused, not run)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for the GPU machine", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    CHECKS.record("platform", lambda: check_platform(args.recipes))
    plat = CHECKS.checks["platform"].get("detail") or {}
    if not plat.get("transformer_engine"):
        for name in ("null_teacher", "rl_steps"):
            CHECKS.not_run(name, "Transformer Engine not importable on this image")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            CHECKS.record("null_teacher_bf16", lambda: check_null_teacher(tmp, None, None))
            base = CHECKS.checks["null_teacher_bf16"].get("detail")
            CHECKS.record("rl_steps_bf16", lambda: check_rl_steps(tmp, None, None))
            base_rl = CHECKS.checks["rl_steps_bf16"].get("detail")
            for recipe in plat.get("recipes_accepted", []):
                CHECKS.record(f"null_teacher_{recipe}", lambda r=recipe: check_null_teacher(tmp, r, base))
                CHECKS.record(f"rl_steps_{recipe}", lambda r=recipe: check_rl_steps(tmp, r, base_rl))
    return CHECKS.write(args.out, "check_fp8")

if __name__ == "__main__":
    sys.exit(main())
