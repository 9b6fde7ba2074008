"""tools/warmup_sft.py --task rlt: the RLT teacher's SFT on its prompt format (question +
solution -> explanation) before RL. The loss on the explanation tokens falls (measured with
full-vocabulary transformers forwards, not the tool's sampled softmax), bad rows are named,
and the result starts an rlt run whose teacher now closes its explanations."""

import json

import pytest
import torch

from megatron_rlrt import parallel
from tests.helpers.trainer_helpers import methods_rank
from tests.test_trainer_e2e import _base


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


@pytest.mark.slow  # SFT + a 1-rank rlt step
def test_rlt_teacher_warmup_lowers_the_loss_and_starts_an_rlt_run(tiny_model, arithmetic_data, tmp_path):
    from tools.warmup_sft import main, read_explanations

    data = tmp_path / "explanations.jsonl"
    _explanations(arithmetic_data, data)
    out = tmp_path / "teacher-sft"
    assert main(["--hf-dir", tiny_model, "--data", str(data), "--output-dir", str(out), "--task", "rlt",
                 "--steps", "60", "--lr", "1e-2", "--batch-size", "8", "--no-progress"]) == 0
    rows = read_explanations([str(data)])
    before, after = _explanation_nll(tiny_model, rows), _explanation_nll(str(out), rows)
    assert after < 0.1 * before, (before, after)  # measured: 11.9 -> 0.4
    # the warmed-up teacher as an rlt run's --hf-checkpoint: it writes explanations that close
    result = tmp_path / "rlt.json"
    argv = _base(str(out), arithmetic_data) + ["--rollout-max-response-len", "40", "--train-iters", "1",
                                               "--global-batch-size", "8"]
    parallel.spawn(methods_rank, 1, argv, ["rlt"], str(result))
    m = json.loads(result.read_text())["rlt"]["metrics"][-1]
    # measured 0.625 of 8 (the starting tiny model never writes the closing tag)
    assert m["rlt/explanation_closed"] > 0.25 and m["actor/grad_norm"] > 0, m


def test_rlt_warmup_rows_are_checked(tmp_path, capsys):
    from tools.warmup_sft import read_explanations

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1 =", "solution": "2", "explanation": "add"}) + "\n"
                   + json.dumps({"prompt": "2 + 2 =", "solution": "4"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: --task rlt needs a non-empty explanation"):
        read_explanations([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: not a JSON object"):
        read_explanations([str(bad)])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q?"}],
                                "solution": "a", "explanation": "e"}) + "\n")
    assert read_explanations([str(chat)]) == [{"question": "q?", "solution": "a", "explanation": "e"}]
