"""Prompt datasets: layouts from jsonl and parquet, chat template rendering, length filter, bad input."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rlrt.data import DataConfig, DatasetError, PromptDataset, PromptRenderer, TemplateConfig, load_prompt_dataset
from megatron_rlrt.tokenizer import load_tokenizer

INSTR = "Please reason step by step, and put your final answer within \\boxed{}."

DAPO_ROWS = [
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve 1+1. The last line of your response should be of the form Answer: $Answer"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "2", "style": "rule"},
        "extra_info": {"index": "a-1"},
    },
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve 2+3."}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "5", "style": "rule"},
        "extra_info": {"index": "a-2"},
    },
]

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "Add: $\\boxed{1}$.", "answer": "1", "level": "Level 1", "type": "Algebra"},
    # no answer column: taken from the solution's last \boxed{}
    {"problem": "Compute $3 \\cdot 4$.", "solution": "We get $\\boxed{12}$.", "level": "Level 2", "type": "Prealgebra"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, "jsonl"), (write_parquet, "parquet")])
def test_dapo_layout_loads_as_is(tmp_path, tok, writer, suffix):
    path = writer(tmp_path / f"dapo.{suffix}", DAPO_ROWS)
    ds = load_prompt_dataset(str(path), tok)
    assert [s.answer for s in ds] == ["2", "5"]
    assert ds[0].messages == DAPO_ROWS[0]["prompt"]
    assert ds[0].data_source == "math_dapo" and ds[0].solution is None
    assert ds[0].metadata["extra_info"] == {"index": "a-1"}
    assert ds[0].source.endswith(f"dapo.{suffix}:1")


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, "jsonl"), (write_parquet, "parquet")])
def test_math_layout_loads_as_is(tmp_path, tok, writer, suffix):
    path = writer(tmp_path / f"math.{suffix}", MATH_ROWS)
    ds = load_prompt_dataset(str(path), tok, template=TemplateConfig(instruction=INSTR))
    assert [s.answer for s in ds] == ["1", "12"]
    assert ds[1].solution == "We get $\\boxed{12}$."
    assert ds[0].metadata["level"] == "Level 1" and ds[0].metadata["type"] == "Algebra"
    assert ds[0].messages == [{"role": "user", "content": MATH_ROWS[0]["problem"] + "\n\n" + INSTR}]


def test_gsm8k_layout_and_explicit_keys(tmp_path, tok):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Q?", "answer": "Some steps.\n#### 1,234"}])
    s = load_prompt_dataset(str(path), tok)[0]
    assert (s.answer, s.solution) == ("1234", "Some steps.")
    path = write_jsonl(tmp_path / "custom.jsonl", [{"input": "Hi?", "target": {"value": 3}, "ref": "because"}])
    s = load_prompt_dataset(str(path), tok, prompt_key="input", answer_key="target.value", solution_key="ref")[0]
    assert (s.prompt, s.answer, s.solution) == ("Hi?", "3", "because")


@pytest.mark.parametrize("thinking", [True, False])
def test_rendering_equals_apply_chat_template(tok, thinking):
    cfg = TemplateConfig(enable_thinking=thinking, system_prompt="You are careful.", instruction=INSTR)
    renderer = PromptRenderer(tok, cfg)
    messages, text, ids = renderer.render("What is 2+2?")
    expected_messages = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "What is 2+2?\n\n" + INSTR},
    ]
    assert messages == expected_messages
    reference = tok.apply_chat_template(expected_messages, tokenize=True, add_generation_prompt=True, enable_thinking=thinking)
    reference_ids = reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
    assert ids == list(reference_ids)
    assert text == tok.apply_chat_template(expected_messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert text.endswith("<think>\n\n</think>\n\n") == (not thinking)


def test_prompt_system_message_wins_over_configured_one(tok):
    renderer = PromptRenderer(tok, TemplateConfig(system_prompt="default"))
    messages, _, _ = renderer.render([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}])
    assert [m["content"] for m in messages] == ["mine", "q"]


def test_max_prompt_length_filter_counts(tmp_path, tok, caplog):
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "long " * 300, "answer": "2"}, {"prompt": "also short", "answer": "3"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    limit = len(PromptRenderer(tok).render("also short")[2])
    with caplog.at_level("WARNING"):
        ds = load_prompt_dataset(str(path), tok, max_prompt_length=limit)
    assert [s.answer for s in ds] == ["1", "3"] and [s.index for s in ds] == [0, 1]
    assert ds.stats.skipped == {"too_long": 1} and ds.stats.rows == 3 and ds.stats.kept == 2
    assert ds.stats.examples["too_long"][0].startswith(f"{path}:2 ")
    warnings = [r for r in caplog.records if "too_long=1" in r.getMessage()]
    assert len(warnings) == 1  # reported once


def test_empty_prompt_and_empty_answer_are_counted_skips(tmp_path, tok):
    rows = [
        {"prompt": "ok", "answer": "1"},
        {"prompt": "   ", "answer": "1"},
        {"prompt": [{"role": "user", "content": ""}], "answer": "1"},
        {"prompt": "q", "answer": None},
        {"prompt": "q", "answer": "  "},
    ]
    ds = load_prompt_dataset(str(write_jsonl(tmp_path / "e.jsonl", rows)), tok)
    assert len(ds) == 1
    assert ds.stats.skipped == {"empty_prompt": 2, "empty_answer": 2}


def test_math_row_without_answer_or_boxed_solution_is_skipped(tmp_path, tok):
    rows = MATH_ROWS + [{"problem": "p", "solution": "no box"}]
    ds = load_prompt_dataset(str(write_jsonl(tmp_path / "m.jsonl", rows)), tok)
    assert len(ds) == 2 and ds.stats.skipped == {"empty_answer": 1}


# ---------------------------------------------------------------- errors that name file and row


def test_missing_column_names_file_row_and_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match=r"m\.jsonl, row 2: missing the answer column 'answer'") as e:
        load_prompt_dataset(str(path), tok)
    assert e.value.row == 2 and e.value.path == str(path)


def test_parquet_null_answer_is_skipped_missing_column_is_an_error(tmp_path, tok):
    # parquet has one schema: a struct field absent from one row reads back as null -> counted skip
    rows = [dict(DAPO_ROWS[0]), dict(DAPO_ROWS[1], reward_model={"style": "rule"})]
    ds = load_prompt_dataset(str(write_parquet(tmp_path / "d.parquet", rows)), tok)
    assert len(ds) == 1 and ds.stats.skipped == {"empty_answer": 1}
    # the column absent from the file altogether -> error at the first row
    rows = [{k: v for k, v in r.items() if k != "reward_model"} for r in DAPO_ROWS]
    path = write_parquet(tmp_path / "n.parquet", rows)
    with pytest.raises(DatasetError, match=r"n\.parquet, row 1: missing the answer column 'reward_model\.ground_truth'"):
        load_prompt_dataset(str(path), tok, layout="dapo")


def test_non_utf8_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl, row 2: not valid UTF-8"):
        load_prompt_dataset(str(path), tok)


def test_invalid_json_and_non_object_rows(tmp_path, tok):
    path = tmp_path / "j.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"j\.jsonl, row 2: invalid JSON"):
        load_prompt_dataset(str(path), tok)
    path.write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"row 2: expected a JSON object"):
        load_prompt_dataset(str(path), tok)


def test_wrong_types_are_errors(tmp_path, tok):
    cases = [
        ({"prompt": 5, "answer": "1"}, "expected a string or a list of chat messages"),
        ({"prompt": [{"role": "robot", "content": "x"}], "answer": "1"}, "has role 'robot'"),
        ({"prompt": [{"text": "x"}], "answer": "1"}, "expected {'role'"),
        ({"prompt": "q", "answer": ["1", "2"]}, "answer is a list; expected a string or a number"),
    ]
    for i, (row, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"t{i}.jsonl", [{"prompt": "fine", "answer": "1"}, row])
        with pytest.raises(DatasetError, match="row 2: .*" + message.replace("[", r"\[").replace("(", r"\(")):
            load_prompt_dataset(str(path), tok)


def test_unknown_format_missing_file_unknown_layout_empty(tmp_path, tok):
    with pytest.raises(DatasetError, match=r"data\.csv: unknown dataset format"):
        load_prompt_dataset(str(tmp_path / "data.csv"), tok)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_prompt_dataset(str(tmp_path / "nothere.jsonl"), tok)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "1"}])
    with pytest.raises(DatasetError, match=r"odd\.jsonl: cannot tell the dataset layout .*\['bar', 'foo'\]"):
        load_prompt_dataset(str(path), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_prompt_dataset(str(tmp_path / "empty.jsonl"), tok)
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"prompt": "", "answer": "1"}])
    with pytest.raises(DatasetError, match="no usable prompts"):
        load_prompt_dataset(str(path), tok)


def test_gz_and_json_array_and_multiple_files(tmp_path, tok):
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "a", "answer": "1"}) + "\n")
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"prompt": "b", "answer": "2"}]))
    ds = PromptDataset.from_config(DataConfig(path=[str(gz), str(arr)], verifier="math"), tok)
    assert [s.answer for s in ds] == ["1", "2"] and {s.verifier for s in ds} == {"math"}
