"""Offline prompt sets with verifiable answers, as rows in our ``rlrt`` jsonl layout.

Every row has ``prompt``, ``answer``, ``verifier`` (the reward that scores it),
``data_source`` and ``metadata``; champ rows also have a step-by-step ``solution`` (a real
privileged context for a teacher view).

* reasoning-gym tasks: ``metadata["reasoning_gym"] = {task, seed, size, config, index, entry}``
  lets the ``reasoning_gym`` reward rebuild the entry and call the task's ``score_answer``.
* champ-dataset (270 competition problems): read from the installed package's JSON, a
  downloaded wheel, or the JSON file itself.
* AIME (14 problems) from OpenAI evals' ``aime_evaluation/samples.jsonl``: read from the
  ``evals`` wheel (``pip download --no-deps evals==3.0.1.post1``) or the extracted file,
  without installing the package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import zipfile
from typing import Any, Iterable, Iterator

CHAMP_JSON = "champ_dataset/dataset_files/v0.json"
EVALS_AIME = "evals/registry/data/aime_evaluation/samples.jsonl"
EVALS_PIN = "evals==3.0.1.post1"

ANSWER_FILTERS = ("all", "no_text", "numeric")
_NUMERIC = re.compile(r"^-?\d+(\.\d+)?(/\d+)?$")
_WORD = re.compile(r"[A-Za-z]{3,}")


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: tuples -> lists, sets -> sorted lists, other objects -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def write_jsonl(rows: Iterable[dict], path: str) -> int:
    """Write rows atomically (temp file + rename); returns the row count."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


# --------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------


def reasoning_gym_rows(
    task: str,
    size: int,
    seed: int,
    config: dict[str, Any] | None = None,
    instruction: str | None = None,
) -> Iterator[dict]:
    """``size`` rows of reasoning-gym ``task`` (config: the task's difficulty kwargs).

    ``instruction`` (e.g. asking for ``<answer>`` tags) is appended to each question.
    """
    import reasoning_gym

    config = dict(config or {})
    ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    for i in range(size):
        entry = ds[i]
        question = entry["question"]
        if instruction:
            question = question.rstrip() + "\n\n" + instruction
        yield {
            "prompt": question,
            "answer": str(entry["answer"]),
            "verifier": "reasoning_gym",
            "data_source": f"reasoning_gym/{task}",
            "metadata": {
                "reasoning_gym": {
                    "task": task,
                    "seed": seed,
                    "size": size,
                    "config": jsonable(config),
                    "index": i,
                    "entry": jsonable(entry),
                }
            },
        }


# --------------------------------------------------------------------------------------
# champ
# --------------------------------------------------------------------------------------


def _read_member(archive: str, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError:
            raise FileNotFoundError(f"{archive} has no {member}") from None


def champ_json(source: str | None = None) -> dict:
    """champ's v0.json: from ``source`` (.json or .whl), else the installed champ-dataset."""
    if source is None:
        spec = importlib.util.find_spec("champ_dataset")  # no import: its __init__ needs natsort
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "champ-dataset is not installed: pip install -c constraints.txt champ-dataset==1.0.0, "
                "or pass the wheel or v0.json path"
            )
        source = os.path.join(list(spec.submodule_search_locations)[0], "dataset_files", "v0.json")
    if source.endswith(".whl"):
        return json.loads(_read_member(source, CHAMP_JSON))
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def keep_answer(answer: str, rule: str) -> bool:
    """``all``; ``no_text``: no English word of 3+ letters (math-verify can compare it);
    ``numeric``: an integer, decimal or fraction."""
    if rule == "all":
        return True
    if rule == "numeric":
        return bool(_NUMERIC.match(answer.strip()))
    if rule == "no_text":
        return not _WORD.search(answer)
    raise ValueError(f"unknown answer filter {rule!r}; expected one of {ANSWER_FILTERS}")


def champ_rows(source: str | None = None, answers: str = "no_text", instruction: str | None = None) -> Iterator[dict]:
    """champ problems with their step-by-step reference solutions as ``solution``."""
    problems = champ_json(source)["problems"]
    for pid, p in problems.items():
        answer = str(p["_answer"]).strip()
        if not keep_answer(answer, answers):
            continue
        question = p["_text"].strip()
        if instruction:
            question += "\n\n" + instruction
        steps = [s["_text"].strip() for s in p.get("solution", {}).get("steps", [])]
        yield {
            "prompt": question,
            "answer": answer,
            "solution": "\n".join(steps),
            "verifier": "math",
            "data_source": "champ",
            "metadata": {"identifier": p.get("identifier", pid), "category": p.get("category")},
        }


# --------------------------------------------------------------------------------------
# AIME (OpenAI evals)
# --------------------------------------------------------------------------------------


def aime_samples(source: str) -> list[dict]:
    """The evals AIME samples from an ``evals`` wheel or the samples.jsonl file."""
    if source.endswith(".whl"):
        text = _read_member(source, EVALS_AIME).decode("utf-8")
    else:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def aime_rows(source: str, keep_system: bool = True, instruction: str | None = None) -> Iterator[dict]:
    """Rows from evals' ``{"input": [messages], "ideal": "079"}`` samples."""
    for i, s in enumerate(aime_samples(source)):
        messages = [dict(m) for m in s["input"] if keep_system or m["role"] != "system"]
        if instruction:
            for m in reversed(messages):
                if m["role"] == "user":
                    m["content"] = m["content"].rstrip() + "\n\n" + instruction
                    break
        yield {
            "prompt": messages,
            "answer": str(s["ideal"]).strip(),
            "verifier": "math",
            "data_source": "aime_evaluation",
            "metadata": {"index": i},
        }
