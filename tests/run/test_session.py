"""A run's plumbing (rlkit.run.session): the run summary holds null, never NaN, in
summary.json and in the sweep table read from it."""

import json

from rlkit.run import sweep
from rlkit.run.session import summarize


def test_summary_json_holds_null_never_nan(tmp_path, capsys):
    history = [{"step": 0, "reward/mean": float("nan")}, {"step": 1, "reward/mean": None}]
    summarize(history, tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} in summary.json")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["reward/mean_first"] is None and summary["eval/accuracy_final"] is None
    assert "mean reward n/a -> n/a" in capsys.readouterr().err
    sweep.write_table([{"name": "x", "summary": summary, "dir": tmp_path}], tmp_path / "t.md")
    assert "| 1 | x | n/a | n/a | n/a |" in (tmp_path / "t.md").read_text()
