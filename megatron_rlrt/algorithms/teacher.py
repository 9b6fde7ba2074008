"""Teacher views: which rollouts get one, their privileged context c, and the teacher prompt.

The teacher is the policy conditioned on c (eq. 1). As in the RLRT authors' base code (an
SDPO fork), c is by default a SUCCESSFUL PEER rollout of the same prompt, never the sample
itself; the teacher prompt renders the template below as the user message through the
tokenizer's chat template, and the teacher sequence is teacher prompt ids + the student's
own response ids, so both score identical response tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from megatron_rlrt.algorithms.atesd import expose_prefix
from megatron_rlrt.algorithms.methods import SUCCESS_THRESHOLD, get_method, is_correct

DEFAULT_TEMPLATE = "{prompt}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."
PEER_CHOICES = ("first", "shortest", "random")
CONTEXT_SOURCES = ("peer", "reference_solution", "reference_answer")

Prompt = Union[str, Sequence[Mapping[str, Any]]]  # user text, or chat messages (last user turn is templated)


@dataclass
class TeacherConfig:
    """context None = the method's default (``MethodSpec.context``). max_teacher_prompt_len
    defaults to SDPO's max_reprompt_len (paper: 2048 prompt + 20480 response tokens)."""

    context: Optional[str] = None
    peer_choice: str = "first"
    template: str = DEFAULT_TEMPLATE
    strip_thinking: bool = False
    max_teacher_prompt_len: int = 22528

    def __post_init__(self) -> None:
        if self.context is not None and self.context not in CONTEXT_SOURCES:
            raise ValueError(f"unknown teacher context {self.context!r}; valid: {list(CONTEXT_SOURCES)}")
        if self.peer_choice not in PEER_CHOICES:
            raise ValueError(f"unknown peer_choice {self.peer_choice!r}; valid: {list(PEER_CHOICES)}")
        if "{prompt}" not in self.template or "{solution}" not in self.template:
            raise ValueError("teacher template must contain {prompt} and {solution}")


@dataclass
class TeacherViewStats:
    requested: int  # rows the method wants a teacher for, context or not
    no_context: int  # of those, rows without any context (e.g. no successful peer)
    truncated: int  # teacher prompts whose solution text was cut to fit
    dropped_overlong: int  # teacher prompts that did not fit even with an empty solution
    built: int

    @property
    def coverage(self) -> float:
        return self.built / self.requested if self.requested else 0.0


@dataclass
class TeacherViews:
    prompt_ids: list[Optional[list[int]]]  # per sample; None = no teacher view
    has_teacher: torch.Tensor  # bool [B]
    peer_index: torch.Tensor  # long [B]: the peer used as context, -1 if none / not a peer context
    stats: TeacherViewStats


def select_teacher_rows(
    method: str,
    rewards: torch.Tensor,
    group_size: int,
    zero_signal_mask: Optional[torch.Tensor] = None,
    has_context: Optional[torch.Tensor] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """bool [B]: rollouts that need a teacher forward.

    rlrt: r = 1 rollouts; rlrt_all / rlsd / sdpo / opsd: all; srpo: r = 0; grpo: none. Always
    restricted to rows with a context, and for the weighting methods to groups with signal
    (A = 0 there, so the weight cannot matter).
    """
    spec = get_method(method)
    batch = rewards.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch size {batch}")
    rows = torch.ones(batch, dtype=torch.bool, device=rewards.device) if has_context is None else has_context.bool()
    correct = is_correct(rewards, success_threshold)
    if spec.teacher_rows == "none":
        return torch.zeros_like(rows)
    if spec.teacher_rows == "correct":
        rows = rows & correct
    elif spec.teacher_rows == "incorrect":
        rows = rows & ~correct
    if spec.teacher_needs_signal:
        if zero_signal_mask is None:
            grouped = rewards.view(-1, group_size)
            zero_signal_mask = (grouped == grouped[:, :1]).all(dim=1).repeat_interleave(group_size)
        rows = rows & ~zero_signal_mask.bool()
    return rows


def choose_peers(
    rewards: torch.Tensor,
    group_size: int,
    rule: str = "first",
    response_lengths: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
) -> torch.Tensor:
    """long [B]: for each rollout, a successful rollout of the same group other than itself
    (-1 if there is none). first: lowest index; shortest: fewest response tokens (ties: lowest
    index); random: uniform, drawn from ``generator`` for reproducibility."""
    if rule not in PEER_CHOICES:
        raise ValueError(f"unknown peer choice {rule!r}; valid: {list(PEER_CHOICES)}")
    if rule == "shortest" and response_lengths is None:
        raise ValueError("peer choice 'shortest' needs response_lengths")
    batch = rewards.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch size {batch}")
    correct = is_correct(rewards, success_threshold).tolist()
    peers = [-1] * batch
    for start in range(0, batch, group_size):
        winners = [j for j in range(start, start + group_size) if correct[j]]
        for i in range(start, start + group_size):
            candidates = [j for j in winners if j != i]
            if not candidates:
                continue
            if rule == "first":
                peers[i] = candidates[0]
            elif rule == "shortest":
                peers[i] = min(candidates, key=lambda j: (response_lengths[j], j))
            else:
                peers[i] = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    return torch.tensor(peers, dtype=torch.long)


_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> blocks; text before a lone </think> (its <think> was in the
    generation prompt) is thinking too."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.split("</think>", 1)[1]
    return text.lstrip()


def render_teacher_prompt(tokenizer, prompt: Prompt, solution: str, template: str, enable_thinking: bool) -> list[int]:
    """Token ids of the chat-templated teacher prompt (generation prompt included)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": template.format(prompt=prompt, solution=solution)}]
    else:
        messages = [dict(m) for m in prompt]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise ValueError("chat prompt has no user message to put the teacher context in")
        messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"], solution=solution)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_teacher_prompt(
    tokenizer, prompt: Prompt, solution: str, template: str, enable_thinking: bool, max_len: int
) -> tuple[Optional[list[int]], bool]:
    """(ids, truncated). Over-long: keep the prompt and the instruction whole and cut the END
    of the solution text (in tokens) until the rendered prompt fits; (None, False) if even an
    empty solution does not fit."""
    ids = render_teacher_prompt(tokenizer, prompt, solution, template, enable_thinking)
    if len(ids) <= max_len:
        return ids, False
    overhead = len(render_teacher_prompt(tokenizer, prompt, "", template, enable_thinking))
    if overhead > max_len:
        return None, False
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    keep = min(max_len - overhead, len(solution_ids))
    while keep > 0:
        cut = tokenizer.decode(solution_ids[:keep], skip_special_tokens=False)
        ids = render_teacher_prompt(tokenizer, prompt, cut, template, enable_thinking)
        if len(ids) <= max_len:
            return ids, True
        keep -= max(1, len(ids) - max_len)  # re-tokenisation at the cut can shift a few tokens
    return render_teacher_prompt(tokenizer, prompt, "", template, enable_thinking), True


def build_teacher_views(
    method: str,
    tokenizer,
    prompts: Sequence[Prompt],
    response_texts: Sequence[str],
    rewards: torch.Tensor,
    group_size: int,
    config: TeacherConfig,
    enable_thinking: bool,
    zero_signal_mask: Optional[torch.Tensor] = None,
    reference_solutions: Optional[Sequence[Optional[str]]] = None,
    reference_answers: Optional[Sequence[Optional[str]]] = None,
    response_lengths: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    success_threshold: float = SUCCESS_THRESHOLD,
    exposure: float = 1.0,
) -> TeacherViews:
    """Teacher prompt ids for every rollout that needs (and can get) a teacher view.

    ``prompts`` and the reference lists may be given per sample (length B) or per group
    (length B / group_size). ``enable_thinking`` must be the student's setting. ``exposure``
    rho shows the teacher only the first floor(rho * n) tokens of its context (ATESD,
    ``algorithms.atesd``); 1 = the whole context, exactly as without it.
    """
    spec = get_method(method)
    batch = rewards.shape[0]
    source = config.context or spec.context
    if len(response_texts) != batch:
        raise ValueError(f"{len(response_texts)} response texts for {batch} rewards")
    prompts = _per_sample("prompts", prompts, batch, group_size)

    requested = select_teacher_rows(method, rewards, group_size, zero_signal_mask, None, success_threshold)
    peers = torch.full((batch,), -1, dtype=torch.long)
    if not bool(requested.any()):
        contexts: list[Optional[str]] = [None] * batch
    elif source == "peer":
        peers = choose_peers(rewards, group_size, config.peer_choice, response_lengths, generator, success_threshold)
        contexts = [response_texts[p] if p >= 0 else None for p in peers.tolist()]
    elif source in ("reference_solution", "reference_answer"):
        refs = reference_solutions if source == "reference_solution" else reference_answers
        if refs is None:
            raise ValueError(f"teacher context {source!r} needs {source}s")
        contexts = [r if r else None for r in _per_sample(source, refs, batch, group_size)]
    else:
        raise ValueError(f"method {method!r} has no teacher context (context={source!r})")

    prompt_ids: list[Optional[list[int]]] = [None] * batch
    no_context = truncated = dropped = 0
    cache: dict[tuple[int, str], tuple[Optional[list[int]], bool]] = {}  # rows of a group often share c
    for i in requested.nonzero().flatten().tolist():
        if contexts[i] is None:
            no_context += 1
            continue
        key = (i // group_size, contexts[i])
        if key not in cache:
            solution = strip_thinking(contexts[i]) if config.strip_thinking else contexts[i]
            solution = expose_prefix(tokenizer, solution, exposure)
            cache[key] = fit_teacher_prompt(tokenizer, prompts[i], solution, config.template, enable_thinking,
                                            config.max_teacher_prompt_len)
        ids, was_cut = cache[key]
        if ids is None:
            dropped += 1
            continue
        truncated += int(was_cut)
        prompt_ids[i] = list(ids)
    has_teacher = torch.tensor([p is not None for p in prompt_ids], dtype=torch.bool)
    peers = torch.where(has_teacher, peers, torch.full_like(peers, -1))
    stats = TeacherViewStats(int(requested.sum()), no_context, truncated, dropped, int(has_teacher.sum()))
    return TeacherViews(prompt_ids, has_teacher, peers, stats)


def _per_sample(name: str, values: Sequence, batch: int, group_size: int) -> list:
    if len(values) == batch:
        return list(values)
    if len(values) * group_size == batch:
        return [v for v in values for _ in range(group_size)]
    raise ValueError(
        f"{name} has {len(values)} entries; expected {batch} (per sample) or {batch // group_size} (per group)"
    )
