"""HF transformers Qwen3ForCausalLM logits == Megatron logits at every supported layout."""

import json

import pytest

from megatron_rlrt import parallel
from tests.helpers.dist_helpers import hf_parity_rank

pytestmark = pytest.mark.slow  # spawns ranks or servers: `-m "not slow"` skips it

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_megatron_logits_match_hf(tiny_models, tmp_path, tp, pp):
    out = tmp_path / "parity.json"
    parallel.spawn(hf_parity_rank, tp * pp, tiny_models, tp, pp, str(out))
    results = json.loads(out.read_text())
    assert set(results) == set(tiny_models)
    for name, r in results.items():
        assert r["ref_abs_max"] > 0.01, f"{name}: reference logits are degenerate"
        assert r["max_abs_diff"] <= 1e-4, f"{name} at TP={tp} PP={pp}: max |diff| {r['max_abs_diff']}"
        assert r["top1"] == 1.0, f"{name} at TP={tp} PP={pp}: top-1 agreement {r['top1']}"
