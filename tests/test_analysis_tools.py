"""analyze_asymmetry / marker_stats: the log-odds z against a hand-computed case, the candidate
split against a brute-force computation, the tool's D_bar_t against transformers' logits of the
student and the teacher forward (teacher prompt rebuilt independently), and the same tool under
torchrun at TP=2 on a megatron checkpoint."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from megatron_rlrt.analysis.scoring import PositionScores
from tests.helpers.torchrun import torchrun_ok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_log_odds_z_hand_computed():
    from megatron_rlrt.analysis.stats import log_odds_z

    # e=10 of E=100 explore tokens, x=2 of X=50 exploit tokens, alpha=0.5:
    # delta = ln(10.5/90.5) - ln(2.5/48.5) = -2.153975 - (-2.965273) = 0.811298
    # var   = 1/10.5 + 1/90.5 + 1/2.5 + 1/48.5 = 0.095238 + 0.011050 + 0.4 + 0.020619 = 0.526906
    # z     = 0.811298 / sqrt(0.526906) = 0.811298 / 0.725883 = 1.117671
    assert log_odds_z(10, 2, 100, 50, 0.5) == pytest.approx(1.117671, abs=1e-5)
    assert log_odds_z(5, 5, 50, 50) == pytest.approx(0.0)
    assert log_odds_z(2, 10, 50, 100) == pytest.approx(-log_odds_z(10, 2, 100, 50))


def _scores(la, lb, tokens, k):
    """PositionScores from full log-prob matrices [T, V] (what the scoring module returns)."""
    la, lb = la.log_softmax(-1), lb.log_softmax(-1)
    ta, tb = la.topk(k, -1).indices, lb.topk(k, -1).indices
    t = torch.arange(len(tokens))
    pa, pb = la.exp(), lb.exp()
    return PositionScores(
        token_ids=torch.tensor(tokens), logp_a=la[t, tokens], logp_b=lb[t, tokens], kl=(pa * (la - lb)).sum(-1),
        js=torch.zeros(len(tokens)), entropy_a=-(pa * la).sum(-1), entropy_b=-(pb * lb).sum(-1),
        top_ids_a=ta, top_a_logp_a=la.gather(1, ta), top_a_logp_b=lb.gather(1, ta), top_ids_b=tb,
        top_b_logp_a=la.gather(1, tb), top_b_logp_b=lb.gather(1, tb),
        max_diff_id=(la - lb).argmax(-1), min_diff_id=(la - lb).argmin(-1))


def test_candidates_and_corpora_against_brute_force():
    from megatron_rlrt.analysis.asymmetry import candidates, critical_positions
    from megatron_rlrt.analysis.markers import corpora, marker_table
    from megatron_rlrt.analysis.stats import log_odds_z

    g = torch.Generator().manual_seed(1)
    la, lb = torch.randn(5, 50, generator=g) * 2, torch.randn(5, 50, generator=g) * 2
    tokens = [3, 7, 7, 1, 9]
    s = _scores(la, lb, tokens, k=8)
    pa, pb = la.softmax(-1), lb.softmax(-1)
    for t in range(5):
        union = sorted(set(pa[t].topk(8).indices.tolist()) | set(pb[t].topk(8).indices.tolist()))
        diff = {v: float(pa[t, v] - pb[t, v]) for v in union}
        want_explore = [v for v in sorted(union, key=lambda v: -diff[v]) if diff[v] > 0][:4]
        want_exploit = [v for v in sorted(union, key=lambda v: diff[v]) if diff[v] < 0][:4]
        got = candidates(s, t, 4)
        assert [c["id"] for c in got["explore"]] == want_explore
        assert [c["id"] for c in got["exploit"]] == want_exploit
        assert got["union_size"] == len(union)
    crit = critical_positions(s, 2)
    assert [c["position"] for c in crit] == s.kl.argsort(descending=True)[:2].tolist()

    explore, exploit = corpora([s], "sampled")
    d = s.d_hat
    assert explore == Counter(t for t, x in zip(tokens, d.tolist()) if x > 0)
    assert exploit == Counter(t for t, x in zip(tokens, d.tolist()) if x < 0)
    explore, exploit = corpora([s], "argmax")
    assert explore == Counter((la.log_softmax(-1) - lb.log_softmax(-1)).argmax(-1).tolist())
    names = {i: w for i, w in enumerate(["alpha", "beta", "gamma", "delta", "x1"] * 10)}
    rows = marker_table(Counter({0: 40, 1: 3, 4: 50}), Counter({0: 10, 1: 30, 4: 1}), names.get, min_count=30)
    assert [r["token"] for r in rows] == ["alpha", "beta"]  # x1 is not alphabetic
    # totals E, X count every token (x1 included), before the filters
    assert rows[0]["z"] == pytest.approx(log_odds_z(40, 10, 93, 41)) and rows[0]["z"] > 0
    assert rows[1]["z"] == pytest.approx(log_odds_z(3, 30, 93, 41)) and rows[1]["z"] < -3


@pytest.fixture(scope="module")
def rollouts(tiny_model, arithmetic_data, tmp_path_factory):
    """evaluate.py's per-problem file: 4 problems x 4 samples, about half 'correct' (hash parity)."""
    from tests.helpers.trainer_helpers import register_test_rewards
    from tools.evaluate import main

    register_test_rewards()
    out = str(tmp_path_factory.mktemp("rollouts"))
    assert main(["--checkpoint", f"m={tiny_model}", "--data", arithmetic_data, "--output-dir", out, "--n-samples", "4",
                 "--max-new-tokens", "6", "--max-problems", "4", "--reward", "hash_parity", "--no-progress"]) == 0
    return os.path.join(out, "m", "train.jsonl")


def _hf_kl(hf_dir, prompt_ids, teacher_ids, response_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def logp(prefix):
        with torch.no_grad():
            out = model(torch.tensor([list(prefix) + list(response_ids)])).logits[0].double().log_softmax(-1)
        return out[len(prefix) - 1 : len(prefix) - 1 + len(response_ids)]

    ls, lt = logp(prompt_ids), logp(teacher_ids)
    return (ls.exp() * (ls - lt)).sum(-1)


def test_analyze_asymmetry_matches_two_transformers_forwards(tiny_model, rollouts, tmp_path):
    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt
    from megatron_rlrt.tokenizer import load_tokenizer
    from tools.analyze_asymmetry import main

    out = str(tmp_path / "asym")
    assert main(["--checkpoint", tiny_model, "--rollouts", rollouts, "--output-dir", out, "--no-progress",
                 "--critical", "2", "--thresholds", "0.001", "0.01"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "asymmetry.jsonl"))]
    problems = {json.loads(line)["id"]: json.loads(line) for line in open(rollouts)}
    assert recs and all(r["correct"] for r in recs)
    tok = load_tokenizer(tiny_model)
    r = recs[0]
    p = problems[r["id"]]
    # the trainer's peer rule, rebuilt by hand: the first OTHER correct rollout of the problem
    peer = next(j for j, ok in enumerate(p["correct"]) if ok and j != r["sample"])
    teacher_ids = render_teacher_prompt(tok, p["messages"], p["responses"][peer], DEFAULT_TEMPLATE, False)
    ref = _hf_kl(tiny_model, p["prompt_ids"], teacher_ids, p["response_ids"][r["sample"]])
    assert torch.allclose(torch.tensor(r["d_bar"], dtype=torch.float64), ref, atol=1e-4, rtol=1e-3)
    assert len(r["critical"]) == 2 and r["critical"][0]["d_bar"] == pytest.approx(float(ref.max()), rel=1e-3)
    summary = json.load(open(os.path.join(out, "summary.json")))
    all_d = [d for x in recs for d in x["d_bar"]]
    assert summary["share_above"][">0.001"] == pytest.approx(sum(d > 0.001 for d in all_d) / len(all_d))
    for f in ("heatmaps.html", "heatmap_0.png", "critical.md"):
        assert os.path.getsize(os.path.join(out, f)) > 500
    assert "<span" in open(os.path.join(out, "heatmaps.html")).read()

    from tools.marker_stats import main as markers

    mk = str(tmp_path / "mk")
    assert markers(["--checkpoint", tiny_model, "--rollouts", rollouts, "--output-dir", mk, "--no-progress",
                    "--min-count", "1", "--any-chars", "--min-len", "1", "--z-threshold", "0"]) == 0
    data = json.load(open(os.path.join(mk, "markers.json")))
    d_hat = [x for rec in recs for x in rec["d_hat"]]
    assert data["explore_total"] == sum(x > 0 for x in d_hat) and data["exploit_total"] == sum(x < 0 for x in d_hat)
    assert os.path.getsize(os.path.join(mk, "volcano.png")) > 1000


def test_analyze_asymmetry_torchrun_tp2_megatron_checkpoint(tiny_model, rollouts, tmp_path):
    """The tool under torchrun (2 ranks, TP=2) on a megatron checkpoint saved at TP=2: D_bar_t as
    transformers computes it from the HF weights."""
    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt
    from megatron_rlrt.convert import hf_to_megatron
    from megatron_rlrt.tokenizer import load_tokenizer

    mcore = str(tmp_path / "mcore")
    hf_to_megatron(tiny_model, mcore, tp=2)
    out = str(tmp_path / "tp2")
    torchrun_ok([os.path.join(REPO, "tools", "analyze_asymmetry.py"), "--checkpoint", mcore, "--rollouts", rollouts,
                 "--output-dir", out, "--no-progress", "--max-rollouts", "2", "--tensor-model-parallel-size", "2"],
                timeout=800)
    recs = [json.loads(line) for line in open(os.path.join(out, "asymmetry.jsonl"))]
    problems = {json.loads(line)["id"]: json.loads(line) for line in open(rollouts)}
    tok = load_tokenizer(tiny_model)
    assert len(recs) == 2
    for r in recs:
        p = problems[r["id"]]
        peer = next(j for j, ok in enumerate(p["correct"]) if ok and j != r["sample"])
        teacher_ids = render_teacher_prompt(tok, p["messages"], p["responses"][peer], DEFAULT_TEMPLATE, False)
        ref = _hf_kl(tiny_model, p["prompt_ids"], teacher_ids, p["response_ids"][r["sample"]])
        assert torch.allclose(torch.tensor(r["d_bar"], dtype=torch.float64), ref, atol=1e-4, rtol=1e-3)
