"""What the GPU check scripts share: the check recorder, one-rank process-group environment, and
the tiny model + data + trainer flags of their RL-step checks (check_megatron.py, check_fp8.py)."""

from __future__ import annotations

import json
import os
import time
import traceback


class Checks:
    """Named checks, each recorded as passed (with its detail and seconds) or failed (with the
    error and traceback); a failing check does not stop the script."""

    def __init__(self):
        self.results: dict = {"checks": {}}

    @property
    def checks(self) -> dict:
        return self.results["checks"]

    def record(self, name: str, fn) -> None:
        start = time.perf_counter()
        try:
            detail = fn()
            self.checks[name] = {"ok": True, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}
        except Exception as exc:  # recorded, the script goes on
            self.checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
        print(f"[{'PASS' if self.checks[name]['ok'] else 'FAIL'}] {name}: "
              f"{self.checks[name].get('detail', self.checks[name].get('error'))}", flush=True)

    def not_run(self, name: str, reason: str) -> None:
        self.checks[name] = {"ok": True, "not_run": True, "detail": f"not run: {reason}"}
        print(f"[NOT RUN] {name}: {reason}", flush=True)

    def write(self, out_dir: str, stem: str) -> int:
        """OUT_DIR/STEM.json and .md; the exit code: 0 when every check passed (or was not run), else 1."""
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(self.results, f, indent=2, default=str)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            for name, r in self.checks.items():
                state = "NOT RUN" if r.get("not_run") else ("PASS" if r["ok"] else "FAIL")
                f.write(f"- **{name}**: {state} {r.get('detail', r.get('error'))}\n")
        return 0 if all(r["ok"] for r in self.checks.values()) else 1


def single_rank_env() -> None:
    """torch.distributed's environment for a world of one (this process), on a free port."""
    from megatron_rlrt import parallel

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(parallel.free_port()))


def rl_model(tmp: str, name: str) -> str:
    """The RL checks' tiny Qwen3 (hidden 256, 4 layers, GQA 4/2, real vocabulary), made once per ``tmp``."""
    from tools.make_tiny_qwen3 import make_tiny_qwen3

    path = os.path.join(tmp, name)
    if not os.path.isdir(path):
        make_tiny_qwen3(path, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64)
    return path


def sum_prompts(tmp: str) -> str:
    """32 plain-sum prompts as a jsonl file (reasoning-gym's own dependencies are not on the GPU image)."""
    from megatron_rlrt.data.generators import write_jsonl

    data = os.path.join(tmp, "train.jsonl")
    write_jsonl([{"prompt": f"What is {a} + {b}? Put the answer in \\boxed{{}}.", "answer": str(a + b)}
                 for a, b in ((i % 7 + 1, 3 * i % 11 + 2) for i in range(32))], data)
    return data


def rl_config(model: str, data: str, train_iters: int, extra=()):
    """Trainer flags of the RL checks: RLRT, bf16, the embedded HF engine on the same GPU, 8 prompts
    x 8 samples of <= 64 tokens, the synthetic ``hash_parity`` reward (registered here)."""
    from megatron_rlrt.config import parse_config
    from megatron_rlrt.reward.registry import _REGISTERED, register_reward
    from megatron_rlrt.reward.testing import HashParityVerifier

    if "hash_parity" not in _REGISTERED:
        register_reward("hash_parity", HashParityVerifier)
    return parse_config(["--hf-checkpoint", model, "--prompt-data", data, "--reward", "hash_parity", "--bf16",
                         "--rollout-batch-size", "8", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "64",
                         "--train-iters", str(train_iters), "--global-batch-size", "32", "--lr", "1e-5",
                         "--no-progress", "--no-tensorboard", "--use-dynamic-batch-size", "--max-tokens-per-gpu",
                         "8192", "--advantage-estimator", "rlrt", *extra])
