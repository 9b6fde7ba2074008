"""Every entry point in tools/ (and the NeMo-Run launcher) answers --help, documents every option,
and is listed with a one-line description in docs/cluster.md."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(p for p in glob.glob(os.path.join(REPO, "tools", "*.py")) if not p.endswith("__init__.py"))
ENTRY_POINTS = TOOLS + [os.path.join(REPO, "examples", "nemo_run", "launch_rlrt.py")]

# Runs `python TOOL --help` as a user would (sys.path[0] = the tool's folder), with argparse patched to
# remember every parser it builds; afterwards reports options, subcommands and parsers lacking text.
_PROBE = r'''
import argparse, json, os, runpy, sys
path = sys.argv[1]
parsers = []
_init = argparse.ArgumentParser.__init__
def _record(self, *a, **k):
    _init(self, *a, **k)
    parsers.append(self)
argparse.ArgumentParser.__init__ = _record
sys.argv = [path, "--help"]
sys.path[0] = os.path.dirname(path)
code = 0
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
problems, subparsers = [], set()
for p in parsers:
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            subparsers.update(id(sp) for sp in act.choices.values())
            problems += [f"{p.prog}: subcommand {c.dest!r} has no help" for c in act._choices_actions
                         if not (c.help or "").strip()]
for p in parsers:
    if id(p) not in subparsers and not (p.description or "").strip():
        problems.append(f"{p.prog}: no description")
    for act in p._actions:
        if isinstance(act, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        if act.help != argparse.SUPPRESS and not (act.help or "").strip():
            problems.append(f"{p.prog}: {'/'.join(act.option_strings) or act.dest} has no help")
descriptions = [p.description for p in parsers if id(p) not in subparsers and p.description]
print("@@PROBE@@" + json.dumps({"code": code, "parsers": len(parsers), "problems": problems,
                                 "description": descriptions[0] if descriptions else ""}))
'''


def _probe(path: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@PROBE@@")]
    assert lines, f"{path}: the probe did not finish:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("@@PROBE@@"):]), proc.stdout


def test_there_are_tools():
    assert len(TOOLS) >= 5, TOOLS


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=[os.path.relpath(p, REPO) for p in ENTRY_POINTS])
def test_help_exits_0_and_documents_every_option(path):
    report, stdout = _probe(path)
    assert report["code"] == 0, f"--help exited {report['code']}:\n{stdout[-2000:]}"
    assert report["parsers"] >= 1, "no argparse parser: --help must come from argparse"
    assert "usage:" in stdout
    assert not report["problems"], "options without help text:\n" + "\n".join(report["problems"])


def test_docs_list_every_tool_with_a_description():
    doc = open(os.path.join(REPO, "docs", "cluster.md"), encoding="utf-8").read()
    section = doc.split("## Tools", 1)
    assert len(section) == 2, "docs/cluster.md has no '## Tools' section"
    listed = section[1].split("\n## ", 1)[0]
    for path in TOOLS:
        name = f"tools/{os.path.basename(path)}"
        lines = [line for line in listed.splitlines() if f"`{name}`" in line]
        assert lines, f"{name} is not listed in docs/cluster.md's Tools section"
        text = lines[0].split(f"`{name}`", 1)[1].strip(" |:-—")
        assert len(text) > 10, f"{name}: no one-line description in docs/cluster.md"
