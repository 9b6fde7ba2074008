import pytest
import torch

from megatron_rlrt.algorithms import TeacherConfig, build_teacher_views
from megatron_rlrt.algorithms.teacher import (
    choose_peers,
    fit_teacher_prompt,
    render_teacher_prompt,
    select_teacher_rows,
    strip_thinking,
)
from megatron_rlrt.algorithms.teacher import DEFAULT_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    from megatron_rlrt.tokenizer import load_tokenizer

    return load_tokenizer()


# three groups of 4: mixed, all correct (zero signal), all wrong (zero signal)
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0] + [1.0] * 4 + [0.0] * 4)
T, F = True, False


@pytest.mark.parametrize(
    "method,expected",
    [
        ("grpo", [F] * 12),
        ("grpo_eb", [F] * 12),
        ("rlrt", [T, T, F, F] + [F] * 8),  # r = 1, groups with signal only
        ("rlrt_all", [T] * 4 + [F] * 8),
        ("rlsd", [T] * 4 + [F] * 8),
        ("sdpo", [T] * 12),
        ("opsd", [T] * 12),
        ("srpo", [F, F, T, T] + [F] * 4 + [T] * 4),  # r = 0
    ],
)
def test_select_teacher_rows(method, expected):
    assert select_teacher_rows(method, REWARDS, group_size=4).tolist() == expected


def test_select_teacher_rows_respects_context_and_given_zero_signal_mask():
    has_context = torch.tensor([F, T, T, T] * 3)
    assert select_teacher_rows("rlrt", REWARDS, 4, has_context=has_context).tolist() == [F, T, F, F] + [F] * 8
    zero = torch.tensor([T] * 4 + [F] * 8)
    assert select_teacher_rows("rlrt_all", REWARDS, 4, zero_signal_mask=zero).tolist() == [F] * 4 + [T] * 8
    with pytest.raises(ValueError, match="does not divide"):
        select_teacher_rows("rlrt", REWARDS, 5)


def test_peer_choice_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert choose_peers(rewards, 4, "first").tolist() == [1, 0, 0, 0, 5, -1, 5, 5]
    lengths = [30, 20, 5, 10, 1, 1, 1, 1]
    assert choose_peers(rewards, 4, "shortest", lengths).tolist() == [3, 3, 3, 1, 5, -1, 5, 5]


@pytest.mark.parametrize("rule", ["first", "shortest", "random"])
def test_teacher_never_gets_its_own_rollout(rule):
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(8 * 50, generator=g) > 0.6).float()
    lengths = torch.randint(1, 100, (400,), generator=g).tolist()
    peers = choose_peers(rewards, 8, rule, lengths, generator=torch.Generator().manual_seed(1))
    for i, p in enumerate(peers.tolist()):
        group = range(i - i % 8, i - i % 8 + 8)
        others_correct = [j for j in group if j != i and rewards[j] == 1]
        if not others_correct:
            assert p == -1
        else:
            assert p != i and p in others_correct


def test_random_peer_choice_is_reproducible():
    rewards = torch.ones(64)
    a = choose_peers(rewards, 8, "random", generator=torch.Generator().manual_seed(3))
    b = choose_peers(rewards, 8, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 8  # not always the same peer


def test_strip_thinking():
    assert strip_thinking("<think>\nlet me see\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_thinking("hmm, so 2+2=4\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_thinking("The answer is 4.") == "The answer is 4."


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_default_template_through_the_chat_template(tok, enable_thinking):
    ids = render_teacher_prompt(tok, "What is 2+2?", "2+2=4. \\boxed{4}", DEFAULT_TEMPLATE, enable_thinking)
    expected = (
        "<|im_start|>user\nWhat is 2+2?\nCorrect solution:\n\n2+2=4. \\boxed{4}\n\n"
        "Correctly solve the original question.<|im_end|>\n<|im_start|>assistant\n"
    )
    if not enable_thinking:
        expected += "<think>\n\n</think>\n\n"
    assert tok.decode(ids) == expected


def test_overlong_teacher_prompt_truncates_the_solution_only(tok):
    prompt, solution = "What is 2+2?", " ".join(f"step{i}" for i in range(200))
    full, cut = fit_teacher_prompt(tok, prompt, solution, DEFAULT_TEMPLATE, True, max_len=10_000)
    assert not cut
    ids, cut = fit_teacher_prompt(tok, prompt, solution, DEFAULT_TEMPLATE, True, max_len=len(full) - 50)
    assert cut and len(full) - 60 <= len(ids) <= len(full) - 50
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 2+2?\nCorrect solution:\n\nstep0 step1")
    assert text.endswith("\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n")
    assert "step199" not in text
    empty = render_teacher_prompt(tok, prompt, "", DEFAULT_TEMPLATE, True)
    assert fit_teacher_prompt(tok, prompt, solution, DEFAULT_TEMPLATE, True, max_len=len(empty) - 1) == (None, False)


def test_build_teacher_views_uses_peers(tok):
    responses = ["<think>a</think>ANSWER_A", "ANSWER_B", "ANSWER_C", "ANSWER_D", "E", "F", "G", "H"]
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    config = TeacherConfig(strip_thinking=True)
    views = build_teacher_views("rlrt_all", tok, ["Q1", "Q2"], responses, rewards, 4, config, enable_thinking=False)
    texts = [tok.decode(p) if p is not None else None for p in views.prompt_ids]
    # group 1: every row gets a view; row 0 sees B (never its own A), the others see A (think stripped)
    assert "ANSWER_B" in texts[0] and "ANSWER_A" not in texts[0]
    for i in (1, 2, 3):
        assert "Correct solution:\n\nANSWER_A\n\n" in texts[i] and "<think>a" not in texts[i]
    assert texts[2].startswith("<|im_start|>user\nQ1\n")
    # group 2 has one success (row 7): row 7 itself has no peer -> no view; the rest see H
    assert texts[7] is None and all("Correct solution:\n\nH\n\n" in texts[i] for i in (4, 5, 6))
    assert views.has_teacher.tolist() == [T, T, T, T, T, T, T, F]
    assert views.peer_index.tolist() == [1, 0, 0, 0, 7, 7, 7, -1]
    assert (views.stats.requested, views.stats.no_context, views.stats.built) == (8, 1, 7)
    assert views.stats.coverage == pytest.approx(7 / 8)

    rlrt = build_teacher_views("rlrt", tok, ["Q1", "Q2"], responses, rewards, 4, config, enable_thinking=False)
    # r = 1 rows only: rows 0, 1 (row 7 has no successful peer)
    assert rlrt.has_teacher.tolist() == [T, T, F, F, F, F, F, F]
    assert (rlrt.stats.requested, rlrt.stats.no_context) == (3, 1)


def test_build_teacher_views_with_reference_and_overlong_drop(tok):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cfg = TeacherConfig(context="reference_solution")
    views = build_teacher_views("sdpo", tok, ["Q"], ["a", "b", "c", "d"], rewards, 4, cfg, True,
                                reference_solutions=["REF SOLUTION"])
    assert all("Correct solution:\n\nREF SOLUTION\n\n" in tok.decode(p) for p in views.prompt_ids)
    tiny = TeacherConfig(context="reference_solution", max_teacher_prompt_len=5)
    views = build_teacher_views("sdpo", tok, ["Q"], ["a", "b", "c", "d"], rewards, 4, tiny, True,
                                reference_solutions=["REF SOLUTION"])
    assert not bool(views.has_teacher.any()) and views.stats.dropped_overlong == 4
    with pytest.raises(ValueError, match="needs reference_solutions"):
        build_teacher_views("opsd", tok, ["Q"], ["a", "b", "c", "d"], rewards, 4, TeacherConfig(), True)


def test_teacher_config_errors():
    with pytest.raises(ValueError, match="peer_choice"):
        TeacherConfig(peer_choice="best")
    with pytest.raises(ValueError, match="teacher context"):
        TeacherConfig(context="oracle")