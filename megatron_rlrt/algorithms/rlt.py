"""RLT: reinforcement-learned teachers (Cetin et al., arXiv 2506.08388; code: SakanaAI/RLT).

The trained policy is a TEACHER: it gets the question q AND the reference solution s and writes
an explanation o. A FROZEN student then reads q + o and is scored on s; the teacher is trained
by GRPO on

    r = r_SS - lambda * r_KL                                            (paper eq. 3)
    r_SS = mean_t log pi_S(s_t | q, o, s_<t) + alpha * min_t log pi_S(s_t | q, o, s_<t)
    r_KL = mean_t KL_t + alpha * max_t KL_t,   KL_t = KL(pi_T(. | q, s, o_<t) || pi_S(. | q, o_<t))

over solution tokens s_t (r_SS) and explanation tokens o_t (r_KL): the teacher conditions on
q + s, the student on q only, so steps that only make sense when the answer is known cost KL.

Defaults are the authors' run config (cfgs/run_cfg/teacher_rlt.yaml of SakanaAI/RLT):
``answer_log_prob_coeff: [1, 0.01]`` and ``kl_penalty_reward_coeff: [3, 0.03]`` with reductions
``[mean, min]`` / ``[mean, max]``, i.e. alpha = 0.01 and lambda = 3; log-probs of both models
are taken at the generation temperature 0.7 (``unbias_teacher_log_probs``,
``unbias_student_log_probs_temp: 0.7``); an explanation without its closing tag costs
``not_matched_penalty: -1``. KL_t: the authors' code uses the single-sample estimate at the
teacher's token, log pi_T(o_t) - log pi_S(o_t) (``use_schulman_kl_estimation: false``), which
needs only the two per-token log-probs; ``kl_token_estimate(..., "full")`` is the exact
full-vocabulary KL for callers that have both distributions.

Templates follow the authors' layout (custom_data/teacher_data.py): the teacher's system prompt
asks for a Solution section then an Explanation section, and the assistant turn is pre-filled
with the solution and the opening explanation tag, so the teacher only generates the
explanation, stopping at ``<|end_of_explanation|>``. The student sees the question as a user
turn and the explanation as its own thinking (Qwen3's ``<think>`` block; the authors' students
used Bespoke-Stratos ``<|begin_of_thought|>`` tags), then the solution. Both sequences are built
from token ids, so the student scores exactly the explanation tokens the teacher sampled.

In the trainer (method ``rlt``, registered at the bottom): the rollout prompt is the teacher
prompt of the dataset row (its question and reference ``solution``); after generation rank 0
builds each rollout's student view (``RltModelReward.view``), every rank scores the views under
the frozen student (a ``WeightSnapshot`` of the starting weights, or ``--rlt-student-load``) in
one packed no-grad pass, and the last pipeline stage computes r from those log-probs and the
old-policy pass's log-probs of the explanation tokens (log pi_T, the policy conditioned on
q + s). Rewards are gathered over data-parallel ranks, then GRPO's group advantage (std
normalised, as the authors' TRL-based GRPO trainer) trains the teacher. Both log-probs are at
``--rollout-temperature`` (the authors sample and score at 0.7). ``--rlt-alpha`` and
``--rlt-lambda`` override alpha and lambda. With ``--kl-coef`` (the authors' beta: 0.04) the
reference is re-synced as theirs (TRL's SyncRefModelCallback: every 32 optimizer steps,
ref <- 0.1 ref + 0.9 policy); our interval counts RL steps, one optimizer step each in the
authors' layout (examples/recipes/rlt_teacher_qwen3_8b.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_rlrt.algorithms.methods import MethodSpec, RewardView, register_method

RLT_ALPHA = 0.01
RLT_LAMBDA = 3.0
RLT_LOGPROB_TEMPERATURE = 0.7
RLT_NOT_MATCHED_PENALTY = -1.0
KL_ESTIMATORS = ("sample", "full")

# The authors' teacher system prompt (SakanaAI/RLT custom_data/teacher_data.py, "stratos" style).
RLT_TEACHER_SYSTEM_PROMPT = (
    "Your role as an assistant involves providing precise and accurate solutions before providing detailed "
    "explanations with your full work showing your systematic thinking process leading to each solution. "
    "Your explanations should show how you engaged in a comprehensive cycle of analysis, summarizing, "
    "exploration, reassessment, reflection, backtracing, and iteration to develop well-considered thinking "
    "process. Please structure your response into two main sections: Solution and Explanation. In the Solution "
    "section, present your well-thought solution that accurately answers the question. The solution should "
    "remain a logical, accurate, concise expression style and detail necessary step needed to reach the "
    "conclusion, formatted as follows: <|begin_of_solution|> {final formatted, precise, and clear solution} "
    "<|end_of_solution|>. In the Explanation section, comprehensively detail your reasoning process using the "
    "specified format: <|begin_of_explanation|> {explanation with steps separated with '\\n\\n'} "
    "<|end_of_explanation|> Each step should show detailed considerations leading to your solutions such as "
    "analisying questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy of "
    "the current steps, refining any errors, and revisiting previous steps. "
)
RLT_TEACHER_PREFILL = "<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"
RLT_EXPLANATION_END = "<|end_of_explanation|>"
RLT_STUDENT_THINK = ("<think>\n", "\n</think>\n\n")


# -- the reward ----------------------------------------------------------------------------------


def masked_mean_plus_extreme(values: torch.Tensor, mask: torch.Tensor, alpha: float, extreme: str) -> torch.Tensor:
    """[B]: mean over masked entries + alpha * (min or max) over them. Rows with no entry: nan
    (the caller decides; ``rlt_reward`` charges the not-matched penalty)."""
    if extreme not in ("min", "max"):
        raise ValueError(f"extreme must be 'min' or 'max', got {extreme!r}")
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.bool()
    count = mask.sum(-1)
    mean = torch.where(mask, values, torch.zeros_like(values)).sum(-1) / count.clamp(min=1)
    fill = torch.full_like(values, float("inf") if extreme == "min" else float("-inf"))
    picked = torch.where(mask, values, fill)
    ext = picked.amin(-1) if extreme == "min" else picked.amax(-1)
    out = mean + alpha * ext
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def student_solution_reward(solution_logprobs: torch.Tensor, solution_mask: torch.Tensor,
                            alpha: float = RLT_ALPHA) -> torch.Tensor:
    """r_SS [B] from the frozen student's log-probs of the solution tokens [B, T]."""
    return masked_mean_plus_extreme(solution_logprobs, solution_mask, alpha, "min")


def kl_token_estimate(teacher: torch.Tensor, student: torch.Tensor, estimator: str = "sample") -> torch.Tensor:
    """KL(pi_T || pi_S) per explanation token. "sample": ``teacher``/``student`` are [B, T]
    log-probs of the teacher's sampled tokens, estimate log pi_T - log pi_S (authors' code).
    "full": they are [B, T, V] log-distributions, exact sum_v p_T (log p_T - log p_S)."""
    if estimator == "sample":
        if teacher.shape != student.shape:
            raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} log-probs differ")
        return teacher - student
    if estimator == "full":
        from megatron_rlrt.algorithms.distillation import kl_divergence

        return kl_divergence(teacher, student)
    raise ValueError(f"unknown RLT KL estimator {estimator!r}; valid: {list(KL_ESTIMATORS)}")


def explanation_kl_reward(token_kl: torch.Tensor, explanation_mask: torch.Tensor,
                          alpha: float = RLT_ALPHA) -> torch.Tensor:
    """r_KL [B] from per-explanation-token KL [B, T]."""
    return masked_mean_plus_extreme(token_kl, explanation_mask, alpha, "max")


@dataclass
class RltReward:
    reward: torch.Tensor  # [B] r = r_SS - lambda r_KL + not-matched penalty
    r_ss: torch.Tensor
    r_kl: torch.Tensor


def rlt_reward(
    solution_logprobs: torch.Tensor,
    solution_mask: torch.Tensor,
    token_kl: torch.Tensor,
    explanation_mask: torch.Tensor,
    alpha: float = RLT_ALPHA,
    lam: float = RLT_LAMBDA,
    matched: Optional[torch.Tensor] = None,
    not_matched_penalty: float = RLT_NOT_MATCHED_PENALTY,
) -> RltReward:
    """r = r_SS - lambda r_KL (+ ``not_matched_penalty`` where the explanation did not close,
    ``matched`` False). Like the authors' nan_to_num: an empty span scores the penalty
    (r_SS = penalty, r_KL = -penalty)."""
    r_ss = torch.nan_to_num(student_solution_reward(solution_logprobs, solution_mask, alpha), nan=not_matched_penalty)
    r_kl = torch.nan_to_num(explanation_kl_reward(token_kl, explanation_mask, alpha), nan=-not_matched_penalty)
    reward = r_ss - lam * r_kl
    if matched is not None:
        reward = reward + torch.where(matched.bool(), 0.0, not_matched_penalty).to(reward.dtype)
    return RltReward(reward, r_ss, r_kl)


# -- the two sequences ---------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_rlt_teacher_prompt(tokenizer, question: str, solution: str,
                              system_prompt: str = RLT_TEACHER_SYSTEM_PROMPT,
                              prefill: str = RLT_TEACHER_PREFILL) -> list[int]:
    """Token ids the teacher generates the explanation after: system + question, then an
    assistant turn pre-filled with the solution and the opening explanation tag."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return _encode(tokenizer, head + prefill.format(solution=solution))


def split_explanation(tokenizer, response_ids: Sequence[int], end_tag: str = RLT_EXPLANATION_END
                      ) -> tuple[list[int], bool]:
    """(explanation ids, matched): the teacher's tokens before the closing tag (all of them,
    matched False, when it never closed). Cut in token space so the ids are the sampled ones."""
    ids = list(response_ids)
    at = tokenizer.decode(ids, skip_special_tokens=False).find(end_tag)
    if at >= 0:  # the longest token prefix whose text ends before the tag (binary search)
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) <= at:
                lo = mid
            else:
                hi = mid - 1
        return ids[:lo], True
    eos = {tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)} - {None}
    while ids and ids[-1] in eos:
        ids.pop()
    return ids, False


@dataclass
class StudentView:
    """The frozen student's sequence: ``prompt_ids`` (question, opening think tag) and
    ``response_ids`` = explanation + closing think + solution + end of turn; the spans index
    ``response_ids``."""

    prompt_ids: list[int]
    response_ids: list[int]
    explanation: slice
    solution: slice


def build_student_view(tokenizer, question: str, explanation_ids: Sequence[int], solution: str,
                       system_prompt: Optional[str] = None, think: tuple[str, str] = RLT_STUDENT_THINK) -> StudentView:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    prompt_ids = _encode(tokenizer, head + think[0])
    close_ids = _encode(tokenizer, think[1])
    solution_ids = _encode(tokenizer, solution)
    end_ids = _encode(tokenizer, "<|im_end|>") if "<|im_end|>" in head else [tokenizer.eos_token_id]
    expl = list(explanation_ids)
    response = expl + close_ids + solution_ids + end_ids
    start = len(expl) + len(close_ids)
    return StudentView(prompt_ids, response, slice(0, len(expl)), slice(start, start + len(solution_ids)))


# -- the method: RLT in the trainer ---------------------------------------------------------------


def rlt_question(row) -> str:
    """The question of a dataset row as the file has it: the prompt text, or the last user turn."""
    if isinstance(row.prompt, str):
        return row.prompt
    users = [m.get("content", "") for m in row.prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _solution(row) -> str:
    if not getattr(row, "solution", None):
        raise ValueError(f"{row.source}: RLT needs a reference solution per row (the teacher explains it and "
                         "the student is scored on it); this row has none -- give the column with "
                         "--solution-key or use a layout that has one")
    return row.solution


def rlt_rollout_prompt(tokenizer, row) -> list[int]:
    """The teacher prompt the policy generates its explanation after (question + solution)."""
    return render_rlt_teacher_prompt(tokenizer, rlt_question(row), _solution(row))


class RltModelReward:
    """``ModelReward`` of RLT: the student view of a rollout, and r = r_SS - lambda r_KL."""

    def view(self, tokenizer, row, response_ids: Sequence[int]) -> RewardView:
        explanation, matched = split_explanation(tokenizer, response_ids)
        sv = build_student_view(tokenizer, rlt_question(row), explanation, _solution(row))
        return RewardView(sv.prompt_ids, sv.response_ids,
                          spans={"explanation": (sv.explanation.start, sv.explanation.stop),
                                 "solution": (sv.solution.start, sv.solution.stop)},
                          flags={"matched": matched})

    def rewards(self, policy_logprobs, view_logprobs, views, cfg=None) -> tuple[torch.Tensor, dict]:
        """``policy_logprobs[i]``: the teacher's (policy's) log-probs of rollout i's response
        tokens (the explanation is their prefix); ``view_logprobs[i]``: the frozen student's
        log-probs of view i's response tokens."""
        n = len(views)
        spans = [(v.spans["explanation"], v.spans["solution"]) for v in views]
        e_width = max([e1 - e0 for (e0, e1), _ in spans] + [1])
        s_width = max([s1 - s0 for _, (s0, s1) in spans] + [1])
        kl = torch.zeros(n, e_width, dtype=torch.float64)
        e_mask = torch.zeros(n, e_width, dtype=torch.bool)
        sol = torch.zeros(n, s_width, dtype=torch.float64)
        s_mask = torch.zeros(n, s_width, dtype=torch.bool)
        for i, ((e0, e1), (s0, s1)) in enumerate(spans):
            teacher, student = policy_logprobs[i].double(), view_logprobs[i].double()
            kl[i, : e1 - e0] = kl_token_estimate(teacher[: e1 - e0], student[e0:e1])
            e_mask[i, : e1 - e0] = True
            sol[i, : s1 - s0] = student[s0:s1]
            s_mask[i, : s1 - s0] = True
        matched = torch.tensor([bool(v.flags.get("matched", True)) for v in views])
        out = rlt_reward(sol, s_mask, kl, e_mask, alpha=getattr(cfg, "rlt_alpha", RLT_ALPHA),
                         lam=getattr(cfg, "rlt_lambda", RLT_LAMBDA), matched=matched)
        stats = {"rlt/r_ss": out.r_ss, "rlt/r_kl": out.r_kl, "rlt/explanation_closed": matched.double(),
                 "rlt/explanation_len": e_mask.sum(-1).double()}
        return out.reward.float(), stats


# The authors' run re-syncs the KL reference (beta 0.04) every 32 steps with mix 0.9
# (teacher_rlt.yaml: sync_ref_model, ref_model_sync_steps: 32, ref_model_mixup_alpha: 0.9).
RLT_REF_UPDATE_INTERVAL = 32
RLT_REF_UPDATE_MIX = 0.9

register_method(MethodSpec("rlt", std_normalize=True, rollout_prompt=rlt_rollout_prompt,
                           model_reward=RltModelReward(), ref_update_interval=RLT_REF_UPDATE_INTERVAL,
                           ref_update_mix=RLT_REF_UPDATE_MIX))
