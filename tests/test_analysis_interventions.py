"""reflection_injection and distribution_shift: the injection sites against D_bar_t computed from
transformers' logits, the flip rates against the per-injection outcomes (verdicts recomputed),
the shift statistics against a direct computation, and both tools end to end on tiny models."""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
import torch

from tests.test_analysis_tools import _hf_kl, _scores


def _register():
    from tests.helpers.trainer_helpers import register_test_rewards

    register_test_rewards()


def test_shift_statistics_against_direct_computation():
    from tools.distribution_shift import DEPTHS, shift_statistics

    g = torch.Generator().manual_seed(3)
    la, lb = torch.randn(30, 40, generator=g) * 2, torch.randn(30, 40, generator=g) * 2
    lb[:10] = la[:10]  # ten positions without any shift
    s = _scores(la, lb, list(range(30)), k=20)
    pa, pb = la.double().softmax(-1), lb.double().softmax(-1)
    m = 0.5 * (pa + pb)
    js = 0.5 * (pa * (pa / m).log()).sum(-1) + 0.5 * (pb * (pb / m).log()).sum(-1)
    s.js = js.float()
    out = shift_statistics([s], 0.1, 20)
    high = [t for t in range(30) if js[t] > 0.1]
    assert out["high_divergence"] == len(high) and 0 < len(high) < 30
    for k in (1, 5, 20):
        want = sum(len(set(pa[t].topk(k).indices.tolist()) & set(pb[t].topk(k).indices.tolist())) / k
                   for t in high) / len(high)
        assert out["overlap"]["y"][k - 1] == pytest.approx(want)
    for th, got in zip(DEPTHS, out["depth"]["y"]):
        assert got == pytest.approx(sum(float(pb[t, pa[t].argmax()]) < th for t in high) / len(high))
    assert out["ccdf"]["y"][0] == pytest.approx(float((js > out["ccdf"]["x"][0]).double().mean()))


def test_reflection_injection_end_to_end(tiny_model, arithmetic_data, tmp_path):
    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt
    from megatron_rlrt.tokenizer import load_tokenizer
    from tools.reflection_injection import main

    _register()
    out = str(tmp_path / "refl")
    assert main(["--checkpoint", f"step0={tiny_model}", "--data", arithmetic_data, "--output-dir", out,
                 "--n-samples", "4", "--max-problems", "3", "--max-new-tokens", "6", "--hard", "0", "1", "2", "3",
                 "--easy", "1", "2", "3", "4", "--reward", "hash_parity", "--no-progress"]) == 0
    inj = [json.loads(line) for line in open(os.path.join(out, "step0", "injections.jsonl"))]
    rollouts = [json.loads(line) for line in open(os.path.join(out, "step0", "rollouts.jsonl"))]
    assert inj and {j["position"] for j in inj} == {"max_kl", "random", "min_kl"}
    for j in inj:  # the verifier's verdict on the continued response, recomputed
        assert j["correct_after"] == (zlib.crc32(j["response_after"].encode()) % 2 == 0)
        assert j["response_after"].count("Wait, let me reconsider.") >= 1
    # injection sites: argmax / argmin of D_bar_t with the reference answer as the teacher's context
    tok = load_tokenizer(tiny_model)
    first = inj[0]
    rec = rollouts[first["problem"]]
    teacher = render_teacher_prompt(tok, rec["messages"], rec["answer"], DEFAULT_TEMPLATE, False)
    d_bar = _hf_kl(tiny_model, rec["prompt_ids"], teacher, rec["response_ids"][first["sample"]])
    sites = {j["position"]: j for j in inj if (j["problem"], j["sample"]) == (first["problem"], first["sample"])}
    assert sites["max_kl"]["t"] == int(d_bar.argmax()) and sites["min_kl"]["t"] == int(d_bar.argmin())
    assert sites["max_kl"]["d_bar"] == pytest.approx(float(d_bar.max()), rel=1e-3, abs=1e-6)
    res = json.load(open(os.path.join(out, "reflection.json")))["step0"]
    for subset, key, flip in (("hard", "flip_to_R", True), ("easy", "flip_to_W", False)):
        for pos in ("max_kl", "random", "min_kl"):
            hits = [j["correct_after"] == flip for j in inj if j["subset"] == subset and j["position"] == pos]
            assert res[key][pos]["n"] == len(hits)
            assert res[key][pos]["rate"] == (sum(hits) / len(hits) if hits else None)
    assert os.path.getsize(os.path.join(out, "reflection.png")) > 1000


def test_distribution_shift_end_to_end(tiny_models, arithmetic_data, tmp_path):
    from tools.distribution_shift import main

    _register()
    out = str(tmp_path / "shift")
    assert main(["--base", tiny_models["tied"], "--checkpoint", f"ft={tiny_models['tied']}", "--data", arithmetic_data,
                 "--output-dir", out, "--n-samples", "2", "--max-problems", "3", "--hard", "0", "1", "2",
                 "--ft-samples", "2", "--max-new-tokens", "5", "--reward", "hash_parity", "--no-progress"]) == 0
    shift = json.load(open(os.path.join(out, "shift.json")))
    ft = shift["checkpoints"]["ft"]
    ft_rollouts = [json.loads(line) for line in open(os.path.join(out, "ft", "rollouts.jsonl"))]
    assert ft["positions"] == sum(len(ids) for r in ft_rollouts for ids in r["response_ids"])
    # the same weights on both sides: no shift anywhere
    assert ft["mean_js"] < 1e-6 and ft["high_divergence"] == 0
    assert os.path.getsize(os.path.join(out, "shift.png")) > 1000
    assert main(["--base", tiny_models["tied"], "--checkpoint", tiny_models["untied"], "--data", arithmetic_data,
                 "--output-dir", out]) == 2  # other architecture: clear error
