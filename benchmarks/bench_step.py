#!/usr/bin/env python
"""RL step-time breakdown for grpo vs rlrt vs rlrt_all vs rlsd, measured in one run.

Every method runs the same steps (same seed, same prompts) on 2 gloo ranks (TP=2) with a
tiny Qwen3 and a synthetic verifier that marks about half of each group correct, so the
teacher paths do their real work. Two optimizer mini-batches per RL step (as the paper's
256-question batch with 128-question mini-batches), so GRPO also needs the no-grad
old-log-prob pass, and RLRT's extra work is exactly the teacher rows in that pass.

Prints per method: rollout / log-prob pass / update / total seconds (median over the timed
steps), teacher tokens / student tokens, and ratios against GRPO:
  * rlrt vs grpo (log-prob pass): should approach 1 + teacher tokens / student tokens
  * rlrt vs rlrt_all: what skipping teacher views of wrong rollouts saves

    python benchmarks/bench_step.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/bench_step.py --steps 6 --rollout-batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("grpo", "rlrt", "rlrt_all", "rlsd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to compare (grpo first)")
    p.add_argument("--steps", type=int, default=4, help="RL steps per method (the first is warm-up, not timed)")
    p.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--n-samples-per-prompt", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-response-len", type=int, default=32, help="response tokens")
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width")
    p.add_argument("--layers", type=int, default=4, help="tiny model depth")
    p.add_argument("--tensor-model-parallel-size", type=int, default=2, help="TP size (world size = TP)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    return p


def _rank(argv: list[str], methods: list[str], out: str) -> None:
    import torch.distributed as dist

    from megatron_rlrt import parallel
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.reward.registry import _REGISTERED, register_reward
    from megatron_rlrt.reward.testing import HashParityVerifier
    from megatron_rlrt.trainer.trainer import Trainer

    if "hash_parity" not in _REGISTERED:
        register_reward("hash_parity", HashParityVerifier)
    results = {}
    for method in methods:
        cfg = parse_config(argv + ["--advantage-estimator", method])
        trainer = Trainer(cfg)
        try:
            steps = [trainer.step(s) for s in range(cfg.train_iters)]
        finally:
            trainer.close()
        if dist.get_rank() == 0:
            results[method] = steps[1:]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    parallel.destroy()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_rlrt import parallel
    from megatron_rlrt.data.generators import reasoning_gym_rows, write_jsonl
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_qwen3(os.path.join(tmp, "model"), hidden_size=args.hidden_size,
                                intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32)
        data = os.path.join(tmp, "train.jsonl")
        write_jsonl(reasoning_gym_rows("chain_sum", size=64, seed=1,
                                       config={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}), data)
        samples = args.rollout_batch_size * args.n_samples_per_prompt
        trainer_argv = [
            "--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity", "--seed", "7",
            "--tensor-model-parallel-size", str(args.tensor_model_parallel_size),
            "--rollout-batch-size", str(args.rollout_batch_size), "--n-samples-per-prompt", str(args.n_samples_per_prompt),
            "--global-batch-size", str(samples // 2), "--rollout-max-response-len", str(args.max_response_len),
            "--train-iters", str(args.steps), "--lr", "1e-5", "--lr-warmup-iters", "0", "--no-progress",
            "--no-tensorboard", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "2048", "--enable-thinking",
        ]
        out = os.path.join(tmp, "results.json")
        parallel.spawn(_rank, args.tensor_model_parallel_size, trainer_argv, args.methods, out)
        with open(out) as f:
            results = json.load(f)

    def med(method, key):
        return statistics.median(step.get(key, 0.0) for step in results[method])

    rows = {}
    for m in args.methods:
        rows[m] = {"rollout_s": med(m, "perf/rollout_time_s"), "logprob_s": med(m, "perf/logprob_time_s_max"),
                   "update_s": med(m, "perf/update_time_s_max"), "step_s": med(m, "perf/step_time_s"),
                   "student_tokens": med(m, "perf/student_tokens_total"),
                   "teacher_tokens": med(m, "perf/teacher_tokens_total")}
    base = rows[args.methods[0]]
    print(f"{'method':10s} {'rollout s':>9s} {'logprob s':>9s} {'update s':>8s} {'step s':>7s} "
          f"{'teacher/student tok':>19s} {'logprob x':>9s} {'expected x':>10s} {'step x':>7s}")
    for m, r in rows.items():
        ratio_tok = r["teacher_tokens"] / max(1.0, r["student_tokens"])
        print(f"{m:10s} {r['rollout_s']:9.2f} {r['logprob_s']:9.2f} {r['update_s']:8.2f} {r['step_s']:7.2f} "
              f"{ratio_tok:19.2f} {r['logprob_s'] / base['logprob_s']:9.2f} {1 + ratio_tok:10.2f} "
              f"{r['step_s'] / base['step_s']:7.2f}")
    if "rlrt" in rows and "rlrt_all" in rows:
        saved = 1 - rows["rlrt"]["logprob_s"] / rows["rlrt_all"]["logprob_s"]
        print(f"skipping teacher views of wrong rollouts (rlrt vs rlrt_all): log-prob pass {saved:.0%} shorter, "
              f"teacher tokens {rows['rlrt']['teacher_tokens']:.0f} vs {rows['rlrt_all']['teacher_tokens']:.0f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
