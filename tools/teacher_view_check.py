#!/usr/bin/env python
"""Does the teacher view help? Student vs teacher on held-out problems, before any RL.

RLRT's signal D_t = log P_S(y_t) - log P_T(y_t) only means "the student chose against an
informed teacher" if the model can read the teacher prompt. This tool checks that on a Hugging
Face checkpoint (e.g. the fidelity study's warm-up model), with the trainer's own teacher
prompt (``algorithms/teacher.py``: template, chat template, peer choice):

1. samples --n-samples student responses per problem and scores them (the trainer's verifiers);
2. for each problem with a correct response, builds the teacher prompt with a successful peer
   as context (RLRT, RLRT-all) and with the reference answer as context (RLSD), samples
   --n-samples responses from each and scores them: teacher accuracy vs the student's on the
   same problems;
3. scores every correct student response under the student and the peer-context teacher
   (one transformers forward each): mean log-likelihood per token, and the token-level
   D_t distribution -- mean, median, quantiles, share D_t > 0, share |D_t| > 0.1 -- and the
   share of RLRT weights w_t = exp(D_t) clipped at 1 +- eps_w for each --eps.

    python tools/teacher_view_check.py --hf-dir outputs/fidelity/tiny-qwen3-warm \\
        --data outputs/fidelity/data/eval.jsonl --max-new-tokens 64

Prints a table and writes it as JSON with --output. A teacher that helps has a higher accuracy
and a higher log-likelihood of correct responses than the student, and D_t centred near 0 with
a sparse tail; an unreadable teacher prompt shows D_t >> 0 on most tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint (model + tokenizer) to check")
    p.add_argument("--data", required=True, help="held-out problems (jsonl/parquet, any layout the trainer reads)")
    p.add_argument("--reward", default="auto", help="verifier: auto (per row) | reasoning_gym | math")
    p.add_argument("--n-samples", type=int, default=8, help="responses per problem, for the student and each teacher view")
    p.add_argument("--max-problems", type=int, default=40, help="first N problems of --data (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the trainer's default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--eps", type=float, action="append", default=None,
                   help="eps_w values whose clip fractions are reported (repeatable; default 0.2, 0.5, 1.0)")
    p.add_argument("--enable-thinking", action="store_true", help="render prompts in Qwen3 thinking mode")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    return p


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def d_statistics(d: list[float], eps_values: list[float]) -> dict:
    """Summary of token-level D_t values on correct rollouts (sign(A) = +1 there, so w_t = exp(D_t))."""
    import math

    n = len(d)
    if n == 0:
        return {"tokens": 0}
    out = {"tokens": n, "d_mean": sum(d) / n, "d_median": quantile(d, 0.5), "d_q05": quantile(d, 0.05),
           "d_q95": quantile(d, 0.95), "d_positive_frac": sum(x > 0 for x in d) / n,
           "d_abs_gt_0.1_frac": sum(abs(x) > 0.1 for x in d) / n}
    for eps in eps_values:
        w = [math.exp(min(x, 50.0)) for x in d]
        out[f"clip_high_frac@{eps:g}"] = sum(x > 1 + eps for x in w) / n
        out[f"clip_low_frac@{eps:g}"] = sum(x < 1 - eps for x in w) / n
    return out


def response_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """log P(y_t | prompt, y_<t) for every response token (one forward; the LM head only at the
    positions that predict response tokens)."""
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=len(response_ids) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0].tolist()


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, choose_peers, render_teacher_prompt
    from megatron_rlrt.analysis import rollouts as R
    from megatron_rlrt.reward import get_reward
    from megatron_rlrt.tokenizer import load_tokenizer

    eps_values = args.eps or [0.2, 0.5, 1.0]
    tok = load_tokenizer(args.hf_dir)
    problems = R.load_problems(R.ProblemSource(args.data, enable_thinking=args.enable_thinking,
                                               limit=args.max_problems or None), tok)
    sampling = R.Sampling(args.n_samples, args.temperature, 1.0, -1, args.max_new_tokens, args.seed)
    sampling.check()
    engine = R.open_engine("hf", args.hf_dir, tok, args.seed, progress=False)
    verifier = get_reward(args.reward)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    n = args.n_samples
    try:
        stop = R.eos_ids(engine, tok)
        decode = lambda s: tok.decode(s.response_ids, skip_special_tokens=True)  # noqa: E731
        groups = R.generate(engine, [p.prompt_ids for p in problems], n, sampling, stop, args.seed)
        texts = [[decode(s) for s in g] for g in groups]
        correct = [[r.correct for r in verifier.score(t, [p] * n).results] for p, t in zip(problems, texts)]
        solved = [i for i, c in enumerate(correct) if any(c)]
        # teacher prompts: a successful peer of the group (the trainer's rule 'first') / the reference answer
        peer_prompts, answer_prompts = [], []
        for i in solved:
            first = choose_peers(torch.tensor([float(x) for x in correct[i]]), n, "first")
            winner = next(j for j in range(n) if correct[i][j])
            peer = int(first[winner]) if int(first[winner]) >= 0 else winner  # the only winner: use itself
            peer_prompts.append(render_teacher_prompt(tok, problems[i].messages, texts[i][peer], DEFAULT_TEMPLATE,
                                                      args.enable_thinking))
            answer_prompts.append(render_teacher_prompt(tok, problems[i].messages, problems[i].answer,
                                                        DEFAULT_TEMPLATE, args.enable_thinking))
        teacher_acc = {}
        for name, prompts in (("peer", peer_prompts), ("answer", answer_prompts)):
            if not prompts:
                teacher_acc[name] = float("nan")
                continue
            out = R.generate(engine, prompts, n, sampling, stop, args.seed + 1)
            hits = []
            for i, g in zip(solved, out):
                hits += [r.correct for r in verifier.score([decode(s) for s in g], [problems[i]] * n).results]
            teacher_acc[name] = sum(hits) / len(hits)
        # likelihood of correct student responses, student view vs peer-context teacher view (RLRT's rows:
        # each correct rollout with ANOTHER correct rollout as its context, as in training)
        d, ll_s, ll_t, rows = [], [], [], 0
        for i in solved:
            flags = torch.tensor([float(x) for x in correct[i]])
            peers = choose_peers(flags, n, "first").tolist()
            for j in range(n):
                if not correct[i][j] or peers[j] < 0:
                    continue
                resp = list(groups[i][j].response_ids)
                t_prompt = render_teacher_prompt(tok, problems[i].messages, texts[i][peers[j]], DEFAULT_TEMPLATE,
                                                 args.enable_thinking)
                s_lp = response_logprobs(model, list(problems[i].prompt_ids), resp)
                t_lp = response_logprobs(model, t_prompt, resp)
                d += [a - b for a, b in zip(s_lp, t_lp)]
                ll_s += s_lp
                ll_t += t_lp
                rows += 1
    finally:
        engine.shutdown()
        verifier.close()
    student_all = sum(map(sum, correct)) / (n * len(problems))
    student_solved = sum(sum(correct[i]) for i in solved) / (n * len(solved)) if solved else float("nan")
    result = {
        "problems": len(problems), "n_samples": n, "problems_with_a_correct_sample": len(solved),
        "student_accuracy": student_all, "student_accuracy_on_those": student_solved,
        "teacher_accuracy_peer_context": teacher_acc["peer"], "teacher_accuracy_answer_context": teacher_acc["answer"],
        "correct_rollouts_scored": rows,
        "student_logprob_per_token": sum(ll_s) / len(ll_s) if ll_s else float("nan"),
        "teacher_logprob_per_token": sum(ll_t) / len(ll_t) if ll_t else float("nan"),
        **d_statistics(d, eps_values),
    }
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.hf_dir):
        print(f"error: --hf-dir {args.hf_dir}: no such directory", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(map(len, result))
    print("| quantity | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k:<{width}} | {v:.4f} |" if isinstance(v, float) else f"| {k:<{width}} | {v} |")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
