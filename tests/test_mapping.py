"""The HF <-> Megatron mapping, checked against mbridge (verl's bridge) and against itself
only where the property is a definition (shard then merge is the identity)."""

import pytest
import torch

from megatron_rlrt.models import mapping as mp
from megatron_rlrt.models.qwen3 import Qwen3Spec
from megatron_rlrt.platform import setup_megatron

setup_megatron()
from mbridge.models.qwen3 import Qwen3Bridge  # noqa: E402

SPECS = {
    "tied": Qwen3Spec(151936, 64, 128, 3, 4, 2, 32, 1e-6, 1e6, 4096, True, "float32"),
    "gqa": Qwen3Spec(1024, 96, 160, 2, 8, 2, 32, 1e-6, 1e6, 4096, False, "float32"),
}
# mbridge names TE-spec modules; these are the TE names of our canonical (local-spec) norms.
LOCAL_TO_TE = {v: k for k, v in mp._TE_TO_LOCAL.items()}


def bridge_for(spec):
    bridge = object.__new__(Qwen3Bridge)  # skip __init__: it builds a TransformerConfig for a GPU

    class HFConfig:
        tie_word_embeddings = spec.tie_word_embeddings
        num_key_value_heads = spec.num_key_value_heads
        hidden_size = spec.hidden_size
        num_attention_heads = spec.num_attention_heads
        head_dim = spec.head_dim

    bridge.hf_config = HFConfig()
    bridge.make_vocab_size_divisible_by = None
    bridge._DIRECT_MAPPING = dict(Qwen3Bridge._DIRECT_MAPPING)
    bridge._adjust_mapping_for_shared_weights()
    return bridge


def te_name(canonical):
    head, _, tail = canonical.partition(".layers.")
    if not tail:
        return canonical
    index, _, rest = tail.partition(".")
    return f"{head}.layers.{index}.{LOCAL_TO_TE.get(rest, rest)}"


@pytest.mark.parametrize("name", list(SPECS))
def test_names_match_mbridge(name):
    spec, bridge = SPECS[name], bridge_for(SPECS[name])
    for m in mp.qwen3_mappings(spec):
        assert list(m.hf_names) == bridge._weight_name_mapping_mcore_to_hf(te_name(m.megatron_name)), m
    # every HF tensor of the model is covered exactly once
    names = mp.expected_hf_names(spec)
    assert len(names) == len(set(names)) == 3 + 11 * spec.num_hidden_layers - spec.tie_word_embeddings


@pytest.mark.parametrize("name", list(SPECS))
def test_tensor_layouts_match_mbridge(name):
    spec, bridge = SPECS[name], bridge_for(SPECS[name])
    g = torch.Generator().manual_seed(0)
    for m in mp.qwen3_mappings(spec)[:9]:  # embedding + one whole layer covers every kind
        hf = [torch.randn(spec.num_attention_heads * spec.head_dim if "q_proj" in n else
                          spec.num_key_value_heads * spec.head_dim if ("k_proj" in n or "v_proj" in n) else
                          spec.intermediate_size if ("gate" in n or "up_proj" in n) else 7,
                          spec.hidden_size, generator=g) for n in m.hf_names]
        ours = mp.hf_to_megatron(m, hf, spec)
        theirs = bridge._weight_to_mcore_format(te_name(m.megatron_name), hf)
        assert ours.equal(theirs), m.megatron_name
        _, back = bridge._weight_to_hf_format(te_name(m.megatron_name), ours)
        assert all(a.equal(b) for a, b in zip(mp.megatron_to_hf(m, ours, spec), back)), m.megatron_name


def test_qkv_layout_is_megatron_group_major():
    """Hand-built: 2 groups, 2 heads per group, head_dim 1 -> rows [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    spec = Qwen3Spec(16, 1, 4, 1, 4, 2, 1, 1e-6, 1e6, 64, True, "float32")
    m = mp.mapping_by_name(spec)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k, v = torch.tensor([[20.0], [21.0]]), torch.tensor([[30.0], [31.0]])
    qkv = mp.hf_to_megatron(m, [q, k, v], spec)
    assert qkv.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    # TP=2 gives each rank one whole group
    assert mp.tp_shard(m, qkv, 1, 2).flatten().tolist() == [12, 13, 21, 31]


def test_gate_up_tp_shards_hold_matching_halves():
    spec = SPECS["gqa"]
    m = mp.mapping_by_name(spec)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate = torch.arange(4.0).reshape(4, 1)
    up = 100 + torch.arange(4.0).reshape(4, 1)
    full = mp.hf_to_megatron(m, [gate, up], spec)
    assert mp.tp_shard(m, full, 0, 2).flatten().tolist() == [0, 1, 100, 101]
    assert mp.tp_shard(m, full, 1, 2).flatten().tolist() == [2, 3, 102, 103]
    shards = [mp.tp_shard(m, full, r, 4) for r in range(4)]
    assert mp.tp_merge(m, shards).equal(full)


def test_canonical_names():
    assert mp.canonical_name("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", 6) == \
        "decoder.layers.7.input_layernorm.weight"
    assert mp.canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", 2) == \
        "decoder.layers.2.pre_mlp_layernorm.weight"
    assert mp.canonical_name("decoder.final_layernorm.weight", 5) == "decoder.final_layernorm.weight"
