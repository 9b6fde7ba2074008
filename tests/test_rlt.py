"""RLT reward: hand-computed reductions and a float64 check against two separate transformers forwards."""

import math

import pytest
import torch

from megatron_rlrt.algorithms.rlt import (
    RLT_ALPHA,
    RLT_LAMBDA,
    RLT_LOGPROB_TEMPERATURE,
    build_student_view,
    explanation_kl_reward,
    kl_token_estimate,
    masked_mean_plus_extreme,
    render_rlt_teacher_prompt,
    rlt_reward,
    split_explanation,
    student_solution_reward,
)


@pytest.fixture(scope="module")
def tok():
    from megatron_rlrt.tokenizer import load_tokenizer

    return load_tokenizer()


def test_reductions_by_hand():
    values = torch.tensor([[-1.0, -3.0, -2.0, 9.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert student_solution_reward(values, mask, 0.5).tolist() == [-2.0 + 0.5 * -3.0, 0.5 + 0.5 * 0.5]
    assert explanation_kl_reward(values, mask, 0.5).tolist() == [-2.0 + 0.5 * -1.0, 0.5 + 0.5 * 0.5]
    empty = masked_mean_plus_extreme(values, torch.zeros_like(mask), 0.5, "min")
    assert torch.isnan(empty).all()
    # defaults: the authors' alpha = 0.01, lambda = 3; the penalty for an unclosed explanation
    out = rlt_reward(values, mask, values.flip(-1), mask, matched=torch.tensor([True, False]))
    r_ss = [-2.0 + RLT_ALPHA * -3.0, 0.5 + RLT_ALPHA * 0.5]
    kl_rows = [[9.0, -2.0, -3.0], [0.0]]  # the flipped rows under the same mask
    r_kl = [sum(r) / len(r) + RLT_ALPHA * max(r) for r in kl_rows]
    assert out.r_ss.tolist() == pytest.approx(r_ss) and out.r_kl.tolist() == pytest.approx(r_kl)
    assert out.reward.tolist() == pytest.approx([r_ss[0] - 3 * r_kl[0], r_ss[1] - 3 * r_kl[1] - 1.0])
    # an empty explanation / solution span scores the not-matched penalty on each term
    none = rlt_reward(values, torch.zeros_like(mask), values, torch.zeros_like(mask))
    assert none.reward.tolist() == [-1.0 - RLT_LAMBDA * 1.0] * 2


def test_split_explanation(tok):
    body = "Step one: 2x = 8.\n\nStep two: x = 4.\n\n"
    ids = tok(body + "<|end_of_explanation|><|im_end|>", add_special_tokens=False)["input_ids"]
    expl, matched = split_explanation(tok, ids)
    assert matched and tok.decode(expl) == body and expl == ids[: len(expl)]
    open_ids = tok(body, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expl, matched = split_explanation(tok, open_ids)
    assert not matched and expl == open_ids[:-1]


def _token_logprobs_f64(model, ids, temperature):
    """log p(ids[i] | ids[:i]) for i >= 1 and the full log-distributions, one forward, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], logp


def test_rlt_reward_matches_float64_from_two_separate_forwards(tok, tiny_model):
    from transformers import AutoModelForCausalLM

    question = "What is x if 2x + 3 = 11?"
    solution = "2x = 8, so x = 4. The answer is \\boxed{4}."
    response = tok("Subtract 3 from both sides.\n\nThen divide by 2.\n\n<|end_of_explanation|><|im_end|>",
                   add_special_tokens=False)["input_ids"]
    expl, matched = split_explanation(tok, response)
    assert matched
    teacher_prompt = render_rlt_teacher_prompt(tok, question, solution)
    assert "<|begin_of_explanation|>" in tok.decode(teacher_prompt[-8:]) and solution in tok.decode(teacher_prompt)
    view = build_student_view(tok, question, expl, solution)
    assert view.response_ids[view.explanation] == expl
    assert tok.decode(view.response_ids[view.solution]) == solution and solution not in tok.decode(view.prompt_ids)
    teacher_ids, student_ids = teacher_prompt + expl, view.prompt_ids + view.response_ids
    temp = RLT_LOGPROB_TEMPERATURE

    # reference: float64 model (teacher and frozen student are both the tiny model here), two forwards
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float64).eval()
    t_lp, t_dist = _token_logprobs_f64(ref_model, teacher_ids, temp)
    s_lp, s_dist = _token_logprobs_f64(ref_model, student_ids, temp)
    tp, sp = len(teacher_prompt), len(view.prompt_ids)
    kl_ref = [t_lp[tp + j - 1] - s_lp[sp + j - 1] for j in range(len(expl))]
    sol_ref = [s_lp[sp + j - 1] for j in range(view.solution.start, view.solution.stop)]
    r_ss_ref = sum(sol_ref) / len(sol_ref) + RLT_ALPHA * min(sol_ref)
    r_kl_ref = sum(kl_ref) / len(kl_ref) + RLT_ALPHA * max(kl_ref)
    full_ref = [float((t_dist[tp + j - 1].exp() * (t_dist[tp + j - 1] - s_dist[sp + j - 1])).sum())
                for j in range(len(expl))]

    # ours: one float32 forward of both sequences as a right-padded batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    width = max(len(teacher_ids), len(student_ids))
    batch = torch.zeros(2, width, dtype=torch.long)
    attn = torch.zeros(2, width, dtype=torch.long)
    for row, ids in enumerate((teacher_ids, student_ids)):
        batch[row, : len(ids)], attn[row, : len(ids)] = torch.tensor(ids), 1
    with torch.no_grad():
        logp = torch.log_softmax(model(batch, attention_mask=attn).logits.float() / temp, dim=-1)

    def response_logprobs(row, prompt_len, n):  # log-probs of the n tokens after the prompt
        pos = torch.arange(prompt_len - 1, prompt_len - 1 + n)
        return logp[row, pos, batch[row, pos + 1]], logp[row, pos]

    n_resp = len(view.response_ids)
    t_resp, t_full = response_logprobs(0, tp, len(expl))
    s_resp, s_full = response_logprobs(1, sp, n_resp)
    expl_mask = torch.zeros(1, len(expl), dtype=torch.bool) | True
    sol_mask = torch.zeros(1, n_resp, dtype=torch.bool)
    sol_mask[0, view.solution] = True
    token_kl = kl_token_estimate(t_resp[None], s_resp[None, view.explanation])
    out = rlt_reward(s_resp[None], sol_mask, token_kl, expl_mask)
    assert out.r_ss.item() == pytest.approx(r_ss_ref, abs=2e-4)
    assert out.r_kl.item() == pytest.approx(r_kl_ref, abs=2e-4)
    assert out.reward.item() == pytest.approx(r_ss_ref - RLT_LAMBDA * r_kl_ref, abs=1e-3)
    assert not math.isclose(r_kl_ref, 0.0, abs_tol=1e-3)  # the two views really differ
    full = kl_token_estimate(t_full[None], s_full[None, view.explanation], "full")
    assert full[0].tolist() == pytest.approx(full_ref, abs=2e-4) and min(full_ref) >= 0
