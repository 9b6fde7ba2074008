"""tools/rlt_distill_data.py: teacher prompts, SFT rows, resume, bad input -- on the tiny Qwen3."""

import json

import pytest

from megatron_rlrt.algorithms.rlt import RLT_STUDENT_THINK, render_rlt_teacher_prompt
from tools import rlt_distill_data as tool

ROWS = [{"problem": "What is 2 + 3?", "solution": "2 + 3 = 5, so \\boxed{5}.", "answer": "5"},
        {"problem": "What is 4 * 2?", "solution": "4 * 2 = 8, so \\boxed{8}.", "answer": "8"},
        {"problem": "What is 9 - 7?", "solution": "9 - 7 = 2, so \\boxed{2}.", "answer": "2"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_distill_rows_resume_and_errors(tmp_path, tiny_model, capsys):
    data = _write(tmp_path / "math.jsonl", ROWS)
    out = str(tmp_path / "sft.jsonl")
    base = ["--teacher", tiny_model, "--data", data, "--output", out, "--max-new-tokens", "6", "--no-progress",
            "--layout", "math", "--batch-problems", "2"]
    # a random tiny model never writes <|end_of_explanation|> in 6 tokens: every explanation is unclosed
    assert tool.main(base + ["--max-problems", "2"]) == 0
    assert _read(out) == [] and "dropped 2 unclosed" in capsys.readouterr().out
    assert len(_read(out + ".done")) == 2
    assert tool.main(base + ["--keep-unclosed", "--n-samples", "2"]) == 0  # resumes: only the third problem
    rows = _read(out)
    assert len(rows) == 2 and {r["prompt"] for r in rows} == {ROWS[2]["problem"]}
    for r in rows:
        assert r["solution"] == ROWS[2]["solution"] and r["explanation_closed"] is False and r["explanation"]
        assert r["messages"][0] == {"role": "user", "content": ROWS[2]["problem"]}
        assert r["messages"][1]["content"] == (RLT_STUDENT_THINK[0] + r["explanation"] + RLT_STUDENT_THINK[1]
                                               + ROWS[2]["solution"])
    assert tool.main(base + ["--keep-unclosed"]) == 0 and len(_read(out)) == 2  # all done: nothing new
    # bad input: no reference solutions
    nosol = _write(tmp_path / "nosol.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    assert tool.main(["--teacher", tiny_model, "--data", nosol, "--output", str(tmp_path / "x.jsonl"),
                      "--no-progress"]) == 2
    assert "no reference solution" in capsys.readouterr().err
    assert tool.main(["--teacher", str(tmp_path / "none"), "--data", data, "--output", out]) == 2


def test_teacher_prompt_layout(tiny_model):
    from megatron_rlrt.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model)
    text = tok.decode(render_rlt_teacher_prompt(tok, ROWS[0]["problem"], ROWS[0]["solution"]))
    system, user, assistant = text.index("Solution and Explanation"), text.index(ROWS[0]["problem"]), text.rindex("assistant")
    assert system < user < assistant < text.index(ROWS[0]["solution"])
    assert text.endswith("<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n")
