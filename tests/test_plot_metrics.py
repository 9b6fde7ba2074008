"""tools/plot_metrics.py (what the quickstart's report draws): series by hand, bad rows named."""

import json

import pytest

from tools.plot_metrics import plot, read_metrics, series


def test_series_smoothing_and_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/mean": r} for s, r in enumerate([0.0, 1.0, 0.5, float("nan"), 1.0], 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = read_metrics(str(run))
    assert [r["step"] for r in loaded] == [1, 2, 3, 4, 5]
    xs, ys = series(loaded, "reward/mean", smooth=2)  # the NaN step is dropped, then a 2-step mean
    assert xs == [1, 2, 3, 5] and ys == pytest.approx([0.0, 0.5, 0.75, 0.75])
    out = plot([str(run)], str(tmp_path / "m.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_row_is_one_error_naming_file_and_row(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl, row 2: invalid JSON"):
        read_metrics(str(bad))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        read_metrics(str(tmp_path / "nope"))
