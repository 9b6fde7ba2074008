"""The analysis scoring module against independent references: float64 formulas on random
logits, and transformers' logits of separate forwards (student, teacher, two policies), at TP=1
and TP=2."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlrt.analysis.scoring import ScoreItem, pair_statistics


def _ref_stats(la: torch.Tensor, lb: torch.Tensor) -> dict:
    """float64 reference: KL(A||B), JS, entropies from full logits [n, V]."""
    la, lb = la.double().log_softmax(-1), lb.double().log_softmax(-1)
    pa, pb = la.exp(), lb.exp()
    m = 0.5 * (pa + pb)
    return {"kl": (pa * (la - lb)).sum(-1),
            "js": 0.5 * (pa * (pa / m).log()).sum(-1) + 0.5 * (pb * (pb / m).log()).sum(-1),
            "entropy_a": -(pa * la).sum(-1), "entropy_b": -(pb * lb).sum(-1), "la": la, "lb": lb}


def test_pair_statistics_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(7, 300, generator=g) * 3, torch.randn(7, 300, generator=g) * 3
    lb[0] = la[0]  # identical distributions: KL = JS = 0
    targets = torch.randint(0, 300, (7,), generator=g)
    got = pair_statistics(la, lb, targets, k=10)
    ref = _ref_stats(la, lb)
    for name in ("kl", "js", "entropy_a", "entropy_b"):
        assert torch.allclose(got[name].double(), ref[name], atol=2e-5, rtol=1e-4), name
    assert abs(float(got["kl"][0])) < 1e-6 and abs(float(got["js"][0])) < 1e-6
    assert (got["js"] <= math.log(2) + 1e-6).all()
    rows = torch.arange(7)
    assert torch.allclose(got["logp_a"].double(), ref["la"][rows, targets], atol=1e-5)
    assert torch.allclose(got["logp_b"].double(), ref["lb"][rows, targets], atol=1e-5)
    assert torch.equal(got["top_ids_a"], ref["la"].topk(10, -1).indices)
    assert torch.equal(got["top_ids_b"], ref["lb"].topk(10, -1).indices)
    assert torch.allclose(got["top_a_logp_b"].double(), ref["lb"].gather(1, got["top_ids_a"]), atol=1e-5)
    assert torch.allclose(got["top_b_logp_a"].double(), ref["la"].gather(1, got["top_ids_b"]), atol=1e-5)
    diff = ref["la"] - ref["lb"]
    assert torch.equal(got["max_diff_id"], diff.argmax(-1)) and torch.equal(got["min_diff_id"], diff.argmin(-1))


def _items(tok):
    """Two rollouts with teacher views of different prompt lengths (as the trainer builds them)."""
    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt

    prompts = ["What is 2 + 3?", "Add 4 and 5."]
    responses = ["Let me add. <answer>5</answer>", "Hmm, maybe <answer>9</answer> or so"]
    items = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s_ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                        enable_thinking=False)
        s_ids = tok(s_ids, add_special_tokens=False)["input_ids"]
        t_ids = render_teacher_prompt(tok, p, "The answer is 5, since 2 + 3 = 5.", DEFAULT_TEMPLATE, False)
        items.append(ScoreItem(i, s_ids, tok(r, add_special_tokens=False)["input_ids"], t_ids))
    return items


def _hf_response_logits(hf_dir, prompt_ids, response_ids):
    """transformers' logits [T, V] predicting each response token, from its own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    p = len(prompt_ids)
    return logits[p - 1 : p - 1 + len(response_ids)]


def _check_views(tiny_model, scores, items):
    for it in items:
        s = scores[it.key]
        ls = _hf_response_logits(tiny_model, it.prompt_ids, it.response_ids)
        lt = _hf_response_logits(tiny_model, it.teacher_prompt_ids, it.response_ids)
        ref = _ref_stats(ls, lt)
        assert s.token_ids.tolist() == list(it.response_ids)
        assert torch.allclose(s.kl.double(), ref["kl"], atol=1e-4, rtol=1e-3), (s.kl, ref["kl"])
        assert float(ref["kl"].max()) > 1e-3  # the two views really differ
        t = torch.arange(len(it.response_ids))
        ids = torch.tensor(it.response_ids)
        assert torch.allclose(s.logp_a.double(), ref["la"][t, ids], atol=1e-4)
        assert torch.allclose(s.logp_b.double(), ref["lb"][t, ids], atol=1e-4)
        assert torch.equal(s.top_ids_a[:, :5], ref["la"].topk(5, -1).indices)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_views_d_bar_matches_two_transformers_forwards(tiny_model, tp, pp):
    from megatron_rlrt.analysis.checkpoints import resolve
    from megatron_rlrt.analysis.jobs import ScoreRun, ScoreTask, run_scoring
    from megatron_rlrt.analysis.scoring import ScoreOptions
    from megatron_rlrt.tokenizer import load_tokenizer

    items = _items(load_tokenizer(tiny_model))
    [scores] = run_scoring([ScoreTask("views", resolve(tiny_model), items)],
                           ScoreRun(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    options=ScoreOptions(topk=20), progress=False))
    _check_views(tiny_model, scores, items)


def test_policies_js_matches_transformers(tiny_models, monkeypatch):
    from megatron_rlrt.analysis.checkpoints import resolve
    from megatron_rlrt.analysis.jobs import ScoreRun, ScoreTask, run_scoring
    from megatron_rlrt.analysis.scoring import ScoreOptions
    from megatron_rlrt.tokenizer import load_tokenizer
    from tools.make_tiny_qwen3 import make_tiny_qwen3
    import tempfile, os
    from tests.conftest import TINY_CONFIGS

    from megatron_rlrt.analysis import scoring

    monkeypatch.setattr(scoring, "_ROW_BLOCK", 3)  # several blocks per pack (one rank: in this process)
    base = tiny_models["tied"]
    with tempfile.TemporaryDirectory() as tmp:
        other = make_tiny_qwen3(os.path.join(tmp, "ft"), seed=7, **TINY_CONFIGS["tied"])
        items = [ScoreItem(it.key, it.prompt_ids, it.response_ids) for it in _items(load_tokenizer(base))]
        [scores] = run_scoring([ScoreTask("policies", resolve(other), items, b=resolve(base))],
                               ScoreRun(options=ScoreOptions(topk=20, max_tokens_per_pack=40), progress=False))
        for it in items:
            ref = _ref_stats(_hf_response_logits(other, it.prompt_ids, it.response_ids),
                             _hf_response_logits(base, it.prompt_ids, it.response_ids))
            assert torch.allclose(scores[it.key].js.double(), ref["js"], atol=1e-5, rtol=1e-3)
            assert torch.allclose(scores[it.key].kl.double(), ref["kl"], atol=1e-4, rtol=1e-3)
