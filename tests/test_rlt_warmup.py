"""tools/warmup_sft.py --task rlt: the RLT teacher's SFT on its prompt format (question +
solution -> explanation) before RL. The loss on the explanation tokens falls (measured with
full-vocabulary transformers forwards, not the tool's sampled softmax), bad rows are named,
and the result starts an rlt run (torchrun, TP=2) whose teacher now closes its explanations."""

import json

import pytest
import torch

from tests.helpers.torchrun import torchrun_ok


def _explanations(data, path):
    rows = [json.loads(line) for line in open(data)]
    with open(path, "w") as f:
        for r in rows:
            expr = r["prompt"].rsplit(":", 1)[1].strip(" =")
            f.write(json.dumps({"prompt": r["prompt"], "solution": r["solution"],
                                "explanation": f"We work out {expr} and get {r['answer']}."}) + "\n")
    return rows


def _explanation_nll(model_dir, rows):
    """Mean -log p of the response tokens (explanation, closing tag, end of turn) under the full softmax."""
    from transformers import AutoModelForCausalLM

    from megatron_rlrt.tokenizer import load_tokenizer
    from tools.warmup_sft import RltTeacherResponses

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    resp = RltTeacherResponses(rows, tok)
    total, n = 0.0, 0
    for p, r in zip(resp.prompts, resp.responses):
        ids = torch.tensor([p + r])
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)  # the positions predicting response tokens
        with torch.no_grad():
            logits = model(ids, logits_to_keep=len(r) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.double(), -1)
        total -= logp[torch.arange(len(r)), ids[0, pos + 1]].sum().item()
        n += len(r)
    return total / n


@pytest.mark.slow  # SFT + torchrun
def test_rlt_teacher_warmup_then_rlt_through_torchrun(tiny_model, arithmetic_data, tmp_path):
    """Warm-up SFT, then its result as --hf-checkpoint of an rlt run through torchrun and the CLI
    (2 processes, TP=2, 2 steps) with the KL term and the reference moved to the policy after
    every step (--ref-update-interval 1, mix 1): the warmed teacher closes its explanations,
    the reference shards move on each TP rank (ref_kl 0 after every update; the 1-rank test in
    test_ref_update.py shows it is > 0 without one) and are checkpointed; the console line has
    rlt's columns, not RLRT's lambda."""
    from tools.warmup_sft import main, read_explanations

    data = tmp_path / "explanations.jsonl"
    _explanations(arithmetic_data, data)
    out = tmp_path / "teacher-sft"
    assert main(["--hf-dir", tiny_model, "--data", str(data), "--output-dir", str(out), "--task", "rlt",
                 "--steps", "60", "--lr", "1e-2", "--batch-size", "8", "--no-progress"]) == 0
    rows = read_explanations([str(data)])
    before, after = _explanation_nll(tiny_model, rows), _explanation_nll(str(out), rows)
    assert after < 0.1 * before, (before, after)  # measured: 11.9 -> 0.42

    run = tmp_path / "run"
    stdout = torchrun_ok([
        "-m", "megatron_rlrt.trainer.cli", "--hf-checkpoint", str(out), "--prompt-data", arithmetic_data, "--advantage-estimator", "rlt",
        "--tensor-model-parallel-size", "2", "--train-iters", "2", "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4", "--rollout-max-response-len", "40", "--global-batch-size", "8", "--lr", "1e-3",
        "--kl-coef", "0.1", "--ref-update-interval", "1", "--ref-update-mix", "1",
        "--plugins", "tests.helpers.hash_parity_plugin", "--reward", "hash_parity", "--save", str(run),
        "--no-progress", "--no-tensorboard"], timeout=800).stdout
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("| reward " in line and "lambda" not in line for line in lines), lines
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["actor/grad_norm"] > 0 and m["ref/updated"] == 1.0 and "rlt/r_kl" in m
        assert m["actor/ref_kl"] == pytest.approx(0, abs=1e-6)  # step 2: the reference is step 1's policy
    # the starting tiny model never writes the closing tag; the warmed teacher mostly does
    assert metrics[0]["rlt/explanation_closed"] > 0.25, metrics[0]
    assert (run / "checkpoints" / "iter_0000002" / "reference").is_dir()


def test_rlt_warmup_rows_are_checked(tmp_path, capsys):
    from tools.warmup_sft import read_explanations

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1 =", "solution": "2", "explanation": "add"}) + "\n"
                   + json.dumps({"prompt": "2 + 2 =", "solution": "4"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl, row 2: --task rlt needs a non-empty explanation"):
        read_explanations([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl, row 1: invalid JSON"):
        read_explanations([str(bad)])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q?"}],
                                "solution": "a", "explanation": "e"}) + "\n")
    assert read_explanations([str(chat)]) == [{"question": "q?", "solution": "a", "explanation": "e"}]
