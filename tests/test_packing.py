import pytest
import torch
from torch import nn

from megatron_rlrt.packing import PackRow, pack_rows, plan_packs
from tests.helpers.packing import batch_rows

T, F = True, False


class TinyCausalLM(nn.Module):
    """A 2-layer pre-norm transformer with learned positions that honours position ids and
    a boolean attention mask (True = masked out, Megatron's convention)."""

    def __init__(self, vocab=40, dim=16, heads=2, layers=2, max_pos=32):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        def block():
            mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            return nn.ModuleDict(dict(n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), o=nn.Linear(dim, dim),
                                      n2=nn.LayerNorm(dim), mlp=mlp))

        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, position_ids, mask):
        x = self.tok(tokens) + self.pos(position_ids)
        b, n, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
            attn = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
            x = x + blk["o"](attn.transpose(1, 2).reshape(b, n, d))
            x = x + blk["mlp"](blk["n2"](x))
        return self.head(x)


def next_token_logprobs(logits, labels):
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_layout_by_hand():
    rows = [
        PackRow([1, 2], [3, 4, 5], "student", 0),
        PackRow([6], [7], "teacher", 0),
        PackRow([8, 9, 10], [11], "student", 1),
    ]
    p = pack_rows(rows)
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 5, 7, 11] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 5
    assert p.labels.tolist() == [[2, 3, 4, 5, 0, 7, 0, 9, 10, 11, 0]]
    assert p.label_mask.tolist() == [[F, T, T, T, F, T, F, F, F, T, F]]
    assert p.student_index.tolist() == [[1, 2, 3], [9, 0, 0]]
    assert p.student_mask.tolist() == [[T, T, T], [T, F, F]]
    assert p.teacher_index.tolist() == [[5, 0, 0]] and p.teacher_sample_index.tolist() == [0]
    assert p.student_sample_index.tolist() == [0, 1]


def test_attention_mask_is_block_diagonal_causal_true_means_masked():
    p = pack_rows([PackRow([1], [2], "student", 0), PackRow([3, 4], [5], "student", 1)])
    visible = ~p.attention_mask()[0, 0]
    assert p.attention_mask().shape == (1, 1, 5, 5) and p.attention_mask().dtype == torch.bool
    assert visible.tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [F, F, T, F, F],
        [F, F, T, T, F],
        [F, F, T, T, T],
    ]


def test_packed_forward_round_trip_equals_separate_forwards():
    torch.manual_seed(0)
    model = TinyCausalLM().double().eval()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 40, (n,), generator=g).tolist()

    prompts, responses = [ids(3), ids(5), ids(2)], [ids(4), ids(2), ids(6)]
    teacher_prompts = [ids(7), None, ids(4)]
    rows = batch_rows(prompts, responses, teacher_prompts)
    packed = pack_rows(rows, pad_to_multiple_of=8)
    assert packed.num_tokens % 8 == 0

    with torch.no_grad():
        logits = model(packed.tokens, packed.position_ids, packed.attention_mask())
    per_pos = next_token_logprobs(logits, packed.labels)
    student, s_mask = packed.gather_student(per_pos)
    teacher, t_mask = packed.gather_teacher(per_pos)
    assert packed.teacher_sample_index.tolist() == [0, 2]

    def separate(prompt, response):
        seq = torch.tensor([prompt + response])
        n = seq.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)[None, None]
        with torch.no_grad():
            lp = model(seq, torch.arange(n)[None], causal).log_softmax(-1)[0]
        start = len(prompt) - 1
        return torch.stack([lp[start + j, r] for j, r in enumerate(response)])

    for i in range(3):
        expected = separate(prompts[i], responses[i])
        n = len(responses[i])
        torch.testing.assert_close(student[i, :n], expected, rtol=0, atol=1e-10)
        assert s_mask[i].sum().item() == n and bool((student[i, n:] == 0).all())
    for row, sample in enumerate(packed.teacher_sample_index.tolist()):
        expected = separate(teacher_prompts[sample], responses[sample])
        torch.testing.assert_close(teacher[row, : len(expected)], expected, rtol=0, atol=1e-10)
    # top-K style trailing dims gather the same way
    topk = logits.log_softmax(-1).topk(3, dim=-1).values
    gathered, _ = packed.gather_student(topk)
    assert gathered.shape == (3, 6, 3)
    torch.testing.assert_close(gathered[0, 0], topk[0, packed.student_index[0, 0]])


def test_plan_packs_budget_balance_and_pairing():
    g = torch.Generator().manual_seed(2)
    prompts = [[1] * int(torch.randint(2, 20, (1,), generator=g)) for _ in range(24)]
    responses = [[2] * int(torch.randint(1, 40, (1,), generator=g)) for _ in range(24)]
    teacher = [[3] * 30 if i % 3 else None for i in range(24)]
    rows = batch_rows(prompts, responses, teacher)
    plan = plan_packs(rows, max_tokens_per_pack=128, num_ranks=4)
    flat = [i for rank in plan for pack in rank for i in pack]
    assert sorted(flat) == list(range(len(rows)))  # every row exactly once
    loads = []
    for rank in plan:
        loads.append(sum(len(rows[i]) for pack in rank for i in pack))
        for pack in rank:
            assert sum(len(rows[i]) for i in pack) <= 128
            samples = {rows[i].sample_index for i in pack}
            for s in samples:  # student and teacher of a sample share the pack (all units fit here)
                assert sum(rows[i].sample_index == s for i in pack) == (2 if teacher[s] else 1)
    unit = [len(p) + len(r) + (len(t) + len(r) if t else 0) for p, r, t in zip(prompts, responses, teacher)]
    longest_unit = max(unit)
    assert max(loads) - min(loads) <= longest_unit


def test_oversized_unit_is_split_and_too_long_rows_raise():
    rows = [PackRow([1] * 6, [2] * 4, "student", 0), PackRow([3] * 5, [2] * 4, "teacher", 0)]
    plan = plan_packs(rows, max_tokens_per_pack=12)
    assert plan == [[[0], [1]]]
    with pytest.raises(ValueError, match="max_tokens_per_pack"):
        plan_packs(rows, max_tokens_per_pack=9)
    with pytest.raises(ValueError, match="role"):
        PackRow([1], [2], "critic", 0)
    with pytest.raises(ValueError, match="prompt token"):
        PackRow([], [2], "student", 0)
    p = pack_rows(rows)
    with pytest.raises(ValueError, match="per-position values"):
        p.gather_student(torch.zeros(5))
