"""Information asymmetry between the student and the teacher view (paper sec. 4, App. E, H).

D_bar_t = KL(P_S^t || P_T^t) flags WHICH positions matter; at a critical position (large
D_bar_t) the candidates are taken from the union of both top-100 sets and split by the sign of
D_hat_t(v) = log P_S(v) - log P_T(v): the largest P_S - P_T are the explore direction (choices
against the teacher), the largest P_T - P_S the exploit direction (what the teacher predicts).
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import torch

from megatron_rlrt.analysis.scoring import PositionScores


def candidates(s: PositionScores, t: int, n: int = 4) -> dict:
    """Top ``n`` explore (largest P_S - P_T) and exploit (largest P_T - P_S) candidates at
    position ``t``, from the union of the student's and the teacher's top-K ids."""
    ids = torch.cat([s.top_ids_a[t], s.top_ids_b[t]])
    ps = torch.cat([s.top_a_logp_a[t], s.top_b_logp_a[t]]).exp()
    pt = torch.cat([s.top_a_logp_b[t], s.top_b_logp_b[t]]).exp()
    seen, uniq = set(), []
    for j, i in enumerate(ids.tolist()):
        if i not in seen:
            seen.add(i)
            uniq.append(j)
    ids, ps, pt = ids[uniq], ps[uniq], pt[uniq]
    diff = ps - pt

    def pick(order):
        return [{"id": int(ids[j]), "p_student": float(ps[j]), "p_teacher": float(pt[j]),
                 "d_hat": float(math.log(max(float(ps[j]), 1e-45)) - math.log(max(float(pt[j]), 1e-45)))}
                for j in order[:n].tolist() if (diff[j] != 0)]

    explore = pick(torch.argsort(diff, descending=True))
    exploit = pick(torch.argsort(-diff, descending=True))
    return {"explore": [c for c in explore if c["p_student"] > c["p_teacher"]],
            "exploit": [c for c in exploit if c["p_teacher"] > c["p_student"]],
            "union_size": len(uniq)}


def critical_positions(s: PositionScores, k: int = 3, n_candidates: int = 4) -> list[dict]:
    """The ``k`` positions with the largest D_bar_t, with their candidates."""
    order = torch.argsort(s.kl, descending=True)[:k].tolist()
    return [{"position": t, "d_bar": float(s.kl[t]), "token_id": int(s.token_ids[t]), "d_hat": float(s.d_hat[t]),
             **candidates(s, t, n_candidates)} for t in order]


def _colour(v: float, vmax: float) -> str:
    """pink (routine) -> white -> green (critical), on a sqrt scale."""
    x = math.sqrt(max(v, 0.0) / vmax) if vmax > 0 else 0.0
    pink, white, green = (253, 224, 239), (255, 255, 255), (0, 150, 60)
    a, b, f = (pink, white, x / 0.25) if x < 0.25 else (white, green, (x - 0.25) / 0.75)
    return "#%02x%02x%02x" % tuple(int(round(a[i] + (b[i] - a[i]) * min(f, 1.0))) for i in range(3))


def html_page(entries: Sequence[dict], title: str) -> str:
    """Full-trajectory heatmaps: ``entries`` hold tokens (str), d_bar, d_hat, critical (from
    :func:`critical_positions`, tokens decoded) and a header line each."""
    vmax = max((max(e["d_bar"], default=0.0) for e in entries), default=0.0)
    out = ["<!doctype html><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
           ".r{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:8px}"
           ".r span{border-radius:2px}.c{outline:2px solid #006d2c}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
           ".ex{color:#1a7f37}.xp{color:#c0369d}</style>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p>Shading: D&#772;<sub>t</sub> = KL(P<sub>S</sub>||P<sub>T</sub>) per token (pink = routine, green = "
           f"critical; colour scale max {vmax:.3g} nats). Hover a token for D&#772;<sub>t</sub> and D&#770;<sub>t</sub>; "
           "outlined tokens are the critical positions listed below each rollout.</p>"]
    for e in entries:
        crit = {c["position"] for c in e["critical"]}
        spans = []
        for t, (tok, d, dh) in enumerate(zip(e["tokens"], e["d_bar"], e["d_hat"])):
            cls = " class='c'" if t in crit else ""
            spans.append(f"<span{cls} style='background:{_colour(d, vmax)}' title='t={t} D_bar={d:.4g} "
                         f"D_hat={dh:+.3g}'>{html.escape(tok)}</span>")
        out.append(f"<h3>{html.escape(e['header'])}</h3><div class='r'>{''.join(spans)}</div>")
        if e["critical"]:
            out.append("<table><tr><th>t</th><th>token</th><th>D&#772;<sub>t</sub></th><th>D&#770;<sub>t</sub>(y<sub>t</sub>)</th>"
                       "<th class='ex'>explore: P<sub>S</sub> &gt; P<sub>T</sub></th>"
                       "<th class='xp'>exploit: P<sub>T</sub> &gt; P<sub>S</sub></th></tr>")
            for c in e["critical"]:
                fmt = lambda cs: ", ".join(f"{html.escape(repr(x['token']))} ({x['p_student']:.2f}/{x['p_teacher']:.2f})"
                                           for x in cs)
                out.append(f"<tr><td>{c['position']}</td><td>{html.escape(repr(c['token']))}</td><td>{c['d_bar']:.4g}</td>"
                           f"<td>{c['d_hat']:+.3g}</td><td class='ex'>{fmt(c['explore'])}</td>"
                           f"<td class='xp'>{fmt(c['exploit'])}</td></tr>")
            out.append("</table><p style='font-size:12px'>(P<sub>S</sub>/P<sub>T</sub>) per candidate; candidates "
                       "from the union of both top-K sets.</p>")
    return "\n".join(out)
