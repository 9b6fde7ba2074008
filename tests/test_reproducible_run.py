"""Two identical CPU runs give identical numbers (the quickstart's README numbers rely on it).

Same seed, same flags, fresh processes: rollouts (seeded HF sampling), rewards (scoring pool,
results kept in submission order), teacher views, the TP=2 megatron forward/backward over gloo
and the optimizer must reproduce every logged value bit for bit; only timings may differ.
"""

import json
import os

from megatron_rlrt import parallel
from tests.helpers.trainer_helpers import train_rank

TIMING = ("perf/", "time/")


def _values(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING) and not k.endswith(("_time_s", "_s"))} for r in rows]


def test_two_runs_with_the_same_seed_log_the_same_numbers(tiny_model, arithmetic_data, tmp_path):
    argv = ["--hf-checkpoint", tiny_model, "--prompt-data", arithmetic_data, "--eval-data", arithmetic_data,
            "--eval-n-samples", "2", "--reward", "hash_parity", "--advantage-estimator", "rlrt",
            "--tensor-model-parallel-size", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "6", "--train-iters", "2", "--eval-interval", "2", "--lr", "1e-3",
            "--lr-warmup-iters", "0", "--global-batch-size", "4", "--no-progress", "--no-tensorboard",
            "--enable-thinking", "--teacher-max-prompt-len", "512", "--seed", "7"]
    runs = []
    for name in ("a", "b"):
        parallel.spawn(train_rank, 2, argv + ["--save", str(tmp_path / name)])
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append(_values(rows))
    assert len(runs[0]) >= 3 and any("eval/avg@2" in r for r in runs[0])  # steps and held-out evaluations
    assert any(r.get("actor/grad_norm", 0) > 0 for r in runs[0])
    assert runs[0] == runs[1]
    # a different seed changes the rollouts: the comparison above can fail
    parallel.spawn(train_rank, 2, argv + ["--seed", "8", "--save", str(tmp_path / "c")])
    other = _values([json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()])
    assert other != runs[0]
    assert os.path.isdir(tmp_path / "a" / "checkpoints")
