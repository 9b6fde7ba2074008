#!/usr/bin/env python
"""Warm-up SFT: give a (tiny) model a starting policy that is right only part of the time.

RL needs a policy that sometimes succeeds. For the CPU quickstart we make one: supervised
fine-tuning on responses that are correct for a fraction of the rows and wrong for the rest,
each announcing its strategy first:

    "Let me add. <answer>12</answer>"      (correct, fraction 1 - --wrong-fraction)
    "Let me guess. <answer>7</answer>"     (a wrong answer)

The warmed-up model then picks a strategy at random (about half and half) and RL has
something real to learn: choosing the strategy that the verifier rewards. Prompts are
rendered exactly as the trainer renders them (megatron_rlrt.data), answers come from the
rows (reasoning-gym tasks with integer answers). Plain transformers in one process: this
is a data-making tool, not part of the RL system.

    python tools/warmup_sft.py --hf-dir tiny --data train.jsonl --output-dir tiny-warm

``--task rlt`` is the RLT paper's short SFT of the teacher on its prompt format before RL
(SakanaAI/RLT cfgs/run_cfg/teacher_sft.yaml): the prompt is exactly the trainer's RLT rollout
prompt (the authors' system prompt, the question, the assistant turn pre-filled with the
solution and the opening explanation tag; algorithms/rlt.py) and the loss is on the
explanation, its closing tag and the end of turn only (the authors mask the teacher's answer,
``mask_teacher_answer``). --data is a jsonl of explanations with ``prompt`` (or ``question``),
``solution`` and ``explanation`` per row -- the columns tools/rlt_distill_data.py writes. The
result is the starting point (--hf-checkpoint) of an ``--advantage-estimator rlt`` run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CORRECT = "Let me add. <answer>{}</answer>"
WRONG = "Let me guess. <answer>{}</answer>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint to start from")
    p.add_argument("--data", required=True, action="append",
                   help="jsonl/parquet prompt file(s) with integer answers (repeatable)")
    p.add_argument("--output-dir", required=True, help="where to write the warmed-up checkpoint")
    p.add_argument("--task", choices=("add", "strategies", "rlt"), default="add",
                   help="add: the quickstart's 'Let me add.' / 'Let me guess.' responses (integer answers); "
                        "strategies: the fidelity study's three-term additions written out by named strategies "
                        "(megatron_rlrt/data/strategy_task.py), with teacher-view rows (--teacher-fraction); "
                        "rlt: the RLT teacher format, question + solution -> explanation, from a jsonl of "
                        "explanations (prompt/question, solution, explanation per row)")
    p.add_argument("--wrong-fraction", type=float, default=0.5, help="fraction of rows with a wrong answer (--task add)")
    p.add_argument("--teacher-fraction", type=float, default=0.5,
                   help="--task strategies: fraction of rows that are teacher views (the trainer's teacher prompt "
                        "with a correct peer solution or the reference answer as context, a correct response)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine decay to 10%%)")
    p.add_argument("--sampled-softmax", type=int, default=4096,
                   help="normalise the loss over the response vocabulary plus this many random negative tokens "
                        "(sampled softmax with the log(V/K) correction) instead of all 151,936 (0: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed for wrong answers, batches and dropout-free init")
    p.add_argument("--enable-thinking", action="store_true", help="render prompts in Qwen3 thinking mode")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class Responses:
    """Draws a warm-up response per row each time the row is used: the strategy (and a wrong
    answer) are sampled fresh, so the model learns P(strategy) per prompt instead of
    memorising one fixed response per question."""

    def __init__(self, samples, tokenizer, wrong_fraction: float):
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.tok = tokenizer
        self.prompts = [list(s.prompt_ids) for s in samples]
        self.answers = [int(s.answer) for s in samples]
        self.values = list(range(min(self.answers) - 3, max(self.answers) + 4))
        self.wrong_fraction = wrong_fraction
        self.correct_fraction = 1 - wrong_fraction
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._cache[text]

    def draw(self, i: int, rng: random.Random) -> tuple[list[int], list[int], bool]:
        """(prompt ids, response ids ending in <|im_end|>, is_correct) for row ``i``."""
        ans = self.answers[i]
        if rng.random() >= self.wrong_fraction:
            return self.prompts[i], self._ids(CORRECT.format(ans)), True
        return self.prompts[i], self._ids(WRONG.format(rng.choice([v for v in self.values if v != ans]))), False

    def vocabulary(self) -> tuple[set[int], set[int]]:
        """(every token a prompt or response can contain, every token a response can contain)."""
        response = {t for v in self.values for text in (CORRECT.format(v), WRONG.format(v)) for t in self._ids(text)}
        return {t for p in self.prompts for t in p} | response, response


def train(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_rlrt.data import DataConfig, PromptDataset, TemplateConfig
    from megatron_rlrt.fsutil import atomic_output_dir, check_output_dir
    from megatron_rlrt.tokenizer import load_tokenizer

    check_output_dir(args.output_dir, args.overwrite)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = load_tokenizer(args.hf_dir)
    if args.task == "rlt":  # rows of explanations, not prompts: read here (clear errors per row)
        ds = None
    else:
        ds = PromptDataset.from_config(DataConfig(path=args.data, template=TemplateConfig(
            enable_thinking=args.enable_thinking)), tok)
    try:
        if args.task == "rlt":
            responses = RltTeacherResponses(read_explanations(args.data), tok)
        elif args.task == "strategies":
            responses = StrategyResponses(list(ds), tok, args.teacher_fraction, args.enable_thinking)
        else:
            responses = Responses(list(ds), tok, args.wrong_fraction)
    except ValueError as exc:
        raise SystemExit(f"error: --data rows do not fit --task {args.task} ({exc})")
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    if not model.config.tie_word_embeddings:
        raise SystemExit("error: warm-up SFT expects tied embeddings (make_tiny_qwen3.py --tied)")
    model.train()
    head = _UsedVocab(model, *responses.vocabulary(), args.sampled_softmax)
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n] + [head.delta]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(1, args.steps))).item()))
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc="warm-up SFT", dynamic_ncols=True)
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        batch = [responses.draw(i, rng) for i in rng.sample(range(len(responses.prompts)),
                                                            min(args.batch_size, len(responses.prompts)))]
        loss = head.loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    head.merge()
    model.eval()
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return {"first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - start,
            "rows": len(responses.prompts), "correct_fraction": responses.correct_fraction}


def read_explanations(paths: list[str]) -> list[dict]:
    """Rows of --task rlt: {"question", "solution", "explanation"} from jsonl files; a bad row
    is an error naming its file and line."""
    from megatron_rlrt.data.errors import DatasetError
    from megatron_rlrt.data.readers import iter_jsonl

    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --data {path}: no such file")
        try:
            for n, row in iter_jsonl(path):
                question = row.get("question", row.get("prompt"))
                if isinstance(question, list):  # chat messages: the last user turn, as the trainer reads it
                    question = next((m.get("content") for m in reversed(question) if m.get("role") == "user"), None)
                missing = [k for k, v in (("prompt/question", question), ("solution", row.get("solution")),
                                          ("explanation", row.get("explanation"))) if not isinstance(v, str) or not v]
                if missing:
                    raise SystemExit(f"error: {path}, row {n}: --task rlt needs a non-empty {', '.join(missing)} "
                                     "(rows as tools/rlt_distill_data.py writes them)")
                rows.append({"question": question, "solution": row["solution"], "explanation": row["explanation"]})
        except DatasetError as exc:
            raise SystemExit(f"error: {exc}") from None
    if not rows:
        raise SystemExit(f"error: --data {', '.join(paths)}: no rows")
    return rows


class RltTeacherResponses:
    """--task rlt: prompt = the trainer's RLT teacher prompt (question + solution, explanation tag
    open), response = explanation + <|end_of_explanation|> + <|im_end|> (the only tokens with loss)."""

    def __init__(self, rows: list[dict], tokenizer):
        from megatron_rlrt.algorithms.rlt import RLT_EXPLANATION_END, render_rlt_teacher_prompt

        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.prompts = [render_rlt_teacher_prompt(tokenizer, r["question"], r["solution"]) for r in rows]
        self.responses = [tokenizer(r["explanation"] + RLT_EXPLANATION_END, add_special_tokens=False)["input_ids"]
                          + [eos] for r in rows]
        self.correct_fraction = 1.0

    def draw(self, i: int, rng: random.Random) -> tuple[list[int], list[int], bool]:
        return self.prompts[i], self.responses[i], True

    def vocabulary(self) -> tuple[set[int], set[int]]:
        response = {t for r in self.responses for t in r}
        return {t for p in self.prompts for t in p} | response, response


class StrategyResponses:
    """The fidelity study's warm-up rows (``megatron_rlrt.data.strategy_task``): student rows
    answer the plain prompt with a strategy drawn from STUDENT_MIX (right or wrong); teacher
    rows (``teacher_fraction``) answer the trainer's own teacher prompt -- rendered by
    ``algorithms.teacher.render_teacher_prompt`` with its default template -- whose context is
    a correct peer solution or the bare reference answer, always correctly."""

    def __init__(self, samples, tokenizer, teacher_fraction: float, enable_thinking: bool):
        from megatron_rlrt.data import strategy_task as task

        self.task = task
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.tok = tokenizer
        self.samples = samples
        self.prompts = [list(s.prompt_ids) for s in samples]
        self.terms = [task.terms_of(s.prompt_text) for s in samples]
        self.teacher_fraction = teacher_fraction
        self.enable_thinking = enable_thinking
        self.correct_fraction = (1 - teacher_fraction) * sum(task.STUDENT_MIX[k] for k in task.CORRECT) + teacher_fraction
        self._cache: dict[str, list[int]] = {}
        self._teacher_cache: dict[tuple[int, str], list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._cache[text]

    def _teacher_prompt(self, i: int, context: str) -> list[int]:
        from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE, render_teacher_prompt

        key = (i, context)
        if key not in self._teacher_cache:
            self._teacher_cache[key] = render_teacher_prompt(self.tok, self.samples[i].messages, context,
                                                             DEFAULT_TEMPLATE, self.enable_thinking)
        return self._teacher_cache[key]

    def draw(self, i: int, rng: random.Random) -> tuple[list[int], list[int], bool]:
        if rng.random() < self.teacher_fraction:
            context, _, text = self.task.teacher_example(self.terms[i], rng)
            return self._teacher_prompt(i, context), self._ids(text), True
        strategy, text = self.task.student_response(self.terms[i], rng)
        return self.prompts[i], self._ids(text), strategy in self.task.CORRECT

    def vocabulary(self) -> tuple[set[int], set[int]]:
        """Every token a (student or teacher) prompt or a response can contain; every response token."""
        task = self.task
        response: set[int] = set()
        used: set[int] = set()
        for i, terms in enumerate(self.terms):
            texts = [task.render(k, terms) for k in task.CORRECT + ("first_two",)]
            s = sum(terms)
            texts += [task.render("estimate", terms, _Fixed(g - s)) for g in range(max(0, s - 3), s + 4) if g != s]
            for text in texts:
                response.update(self._ids(text))
            for context in task.CORRECT:
                used.update(self._teacher_prompt(i, task.render(context, terms)))
            used.update(self._teacher_prompt(i, str(s)))
        used |= {t for p in self.prompts for t in p}
        return used | response, response


class _Fixed:
    """A stand-in rng whose choice() returns one value (to enumerate the estimate strategy's answers)."""

    def __init__(self, value):
        self.value = value

    def choice(self, _):
        return self.value


class _UsedVocab:
    """Train only the embedding rows of tokens the task uses; the other ~151k stay frozen.

    The (tied) embedding is read through ``inputs_embeds`` = frozen row + trainable delta, and
    the LM-head softmax is normalised over the response tokens plus ``negatives`` random other
    tokens whose logits get + log(#others / negatives) (sampled softmax, Jean et al. 2015).
    A step then costs milliseconds instead of a full [tokens, 151936] softmax and a dense Adam
    update of the whole embedding. ``merge`` writes the deltas into the embedding.
    """

    def __init__(self, model, used: set[int], response_tokens: set[int], negatives: int):
        import torch

        self.model = model
        self.weight = model.get_input_embeddings().weight
        self.weight.requires_grad_(False)
        used = sorted(used)
        self.used = torch.tensor(used)
        self.slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long)
        self.slot[self.used] = torch.arange(len(used))
        self.delta = torch.nn.Parameter(torch.zeros(len(used), self.weight.shape[1]))
        self.targets = torch.tensor(sorted(response_tokens))
        others = torch.ones(self.weight.shape[0], dtype=torch.bool)
        others[self.targets] = False
        self.pool = others.nonzero()[:, 0]
        self.negatives = negatives

    def rows(self, ids):
        """Current embedding rows of token ids (frozen + delta where trainable)."""
        import torch

        slot = self.slot[ids]
        extra = torch.where((slot >= 0)[..., None], self.delta[slot.clamp(min=0)], torch.zeros(()))
        return self.weight[ids] + extra

    def loss(self, batch):
        """Mean cross-entropy over response tokens; the LM head only sees response positions."""
        import torch

        width = max(len(p) + len(r) for p, r, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (p, r, _) in enumerate(batch):  # left padding keeps the response at the end
            seq = p + r
            ids[i, width - len(seq):] = torch.tensor(seq)
            attn[i, width - len(seq):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.model(inputs_embeds=self.rows(ids), attention_mask=attn, position_ids=pos).last_hidden_state
        rows, cols, targets = [], [], []
        for i, (_, r, _) in enumerate(batch):
            for j in range(len(r)):
                rows.append(i)
                cols.append(width - len(r) - 1 + j)
                targets.append(r[j])
        h = hidden[rows, cols]
        neg = self.pool[torch.randint(len(self.pool), (self.negatives,))] if self.negatives else self.pool
        cand = torch.cat([self.targets, neg])
        logits = h @ self.rows(cand).t()
        if self.negatives:
            logits[:, len(self.targets):] += torch.log(torch.tensor(len(self.pool) / self.negatives))
        index = torch.full((self.weight.shape[0],), -1, dtype=torch.long)
        index[self.targets] = torch.arange(len(self.targets))
        return torch.nn.functional.cross_entropy(logits.float(), index[torch.tensor(targets)])

    def merge(self):
        import torch

        with torch.no_grad():
            self.weight[self.used] += self.delta
        self.weight.requires_grad_(True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stats = train(args)
    print(f"warm-up SFT: {stats['rows']} prompts ({stats['correct_fraction']:.0%} of drawn responses correct), "
          f"loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}, {stats['seconds']:.0f}s -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
