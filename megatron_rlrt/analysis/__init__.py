"""The paper's analyses as library code (tools/evaluate.py, analyze_asymmetry.py, marker_stats.py,
reflection_injection.py, distribution_shift.py are thin command lines over it).

* ``checkpoints``  -- a Hugging Face directory or a megatron-rlrt checkpoint (any TP/PP): its
  tokenizer, its HF weights for generation, megatron model chunks for scoring.
* ``rollouts``     -- generate K samples per problem with a rollout engine (embedded HF, SGLang,
  vLLM), score them with the project's verifiers, read/write per-problem jsonl (resumable).
* ``scoring``      -- ONE packed no-grad forward that scores rollouts under two views (student and
  teacher rows, as in the trainer) or two policies, and returns per-position full-vocabulary
  statistics (KL, JS, entropies, top-K on both sides); works under TP/PP.
* ``stats``        -- the estimators: pass@k, log-odds z-scores, CCDFs, top-k overlap.
* ``plots``        -- every figure (matplotlib, Agg backend).
"""
