"""Explore / exploit marker tokens (paper sec. 4.3, Fig. 3, App. D).

Two corpora of token occurrences are built from scored rollouts:

* ``sampled``: the token the student actually chose, y_t, goes to the explore corpus when it was
  chosen against the teacher (D_hat_t(y_t) > 0) and to the exploit corpus when with it (< 0);
* ``argmax`` (App. D exactly): at every position, argmax_v D_hat_t(v) over the whole vocabulary
  goes to the explore corpus and argmin_v to the exploit corpus.

Each token type v is scored with Monroe et al.'s smoothed log-odds z (``stats.log_odds_z``,
alpha = 0.5); z >> 0 marks explore tokens, z << 0 exploit tokens.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Optional

from megatron_rlrt.analysis.scoring import PositionScores
from megatron_rlrt.analysis.stats import log_odds_z


def corpora(scores: Iterable[PositionScores], mode: str = "sampled") -> tuple[Counter, Counter]:
    """(explore, exploit) Counters of token ids."""
    explore, exploit = Counter(), Counter()
    for s in scores:
        if mode == "sampled":
            d = s.d_hat
            explore.update(s.token_ids[d > 0].tolist())
            exploit.update(s.token_ids[d < 0].tolist())
        elif mode == "argmax":
            explore.update(s.max_diff_id.tolist())
            exploit.update(s.min_diff_id.tolist())
        else:
            raise ValueError(f"unknown corpus mode {mode!r}; expected 'sampled' or 'argmax'")
    return explore, exploit


def keep_token(text: str, alpha_only: bool = True, min_len: int = 3, max_len: int = 15) -> bool:
    """App. D's filter: ASCII alphabetic tokens of 3..15 characters (after stripping spaces)."""
    if not min_len <= len(text) <= max_len:
        return False
    return not alpha_only or (text.isascii() and text.isalpha())


def marker_table(explore: Counter, exploit: Counter, decode: Callable[[int], str], min_count: int = 30,
                 alpha: float = 0.5, alpha_only: bool = True, min_len: int = 3, max_len: int = 15,
                 lowercase: bool = False, stopwords: Optional[set] = None) -> list[dict]:
    """Rows {token, explore, exploit, z} for every token type passing the filters, sorted by z
    (most explore-leaning first). Totals E and X are the corpus sizes before filtering."""
    e_total, x_total = sum(explore.values()), sum(exploit.values())
    e_by, x_by = Counter(), Counter()
    for counts, into in ((explore, e_by), (exploit, x_by)):
        for tid, n in counts.items():
            text = decode(tid).strip()
            into[text.lower() if lowercase else text] += n
    rows = []
    for text in set(e_by) | set(x_by):
        e, x = e_by[text], x_by[text]
        if e + x < min_count or not keep_token(text, alpha_only, min_len, max_len):
            continue
        if stopwords and text.lower() in stopwords:
            continue
        rows.append({"token": text, "explore": e, "exploit": x, "z": log_odds_z(e, x, e_total, x_total, alpha)})
    return sorted(rows, key=lambda r: -r["z"])
