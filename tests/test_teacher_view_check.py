"""tools/teacher_view_check.py: the D_t summary against hand-computed values."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import teacher_view_check as T  # noqa: E402


def test_d_statistics_by_hand():
    d = [0.0, 0.05, -0.2, 1.0]
    s = T.d_statistics(d, [0.2, 0.5])
    assert s["tokens"] == 4
    assert s["d_mean"] == pytest.approx(0.2125)
    assert s["d_median"] == pytest.approx(0.025)  # between 0.0 and 0.05
    assert s["d_positive_frac"] == 0.5  # 0.05 and 1.0
    assert s["d_abs_gt_0.1_frac"] == 0.5  # -0.2 and 1.0
    # w = exp(D): 1, 1.051, 0.819, 2.718 -> above 1.2 / 1.5: one; below 0.8: none; below 0.5: none
    assert s["clip_high_frac@0.2"] == 0.25 and s["clip_low_frac@0.2"] == 0.0
    assert s["clip_high_frac@0.5"] == 0.25 and s["clip_low_frac@0.5"] == 0.0
    assert math.exp(-0.2) > 0.8  # the boundary case above really is inside the clip range
    assert T.d_statistics([], [0.2]) == {"tokens": 0}


def test_quantile_interpolates():
    assert T.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert T.quantile([0.0, 10.0], 0.95) == pytest.approx(9.5)


def test_response_logprobs_equal_a_full_forward():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Qwen3ForCausalLM(cfg).eval()
    prompt, response = [1, 2, 3, 4, 5], [6, 7, 8]
    got = T.response_logprobs(model, prompt, response)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0].float(), -1)
    want = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)]
    assert got == pytest.approx(want, abs=1e-6)
