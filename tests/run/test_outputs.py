"""Run outputs (rlkit.run.outputs): metrics.jsonl a line per record, written as it comes, NaN and
inf as null; wall-clock timings in a file of their own (so two runs' metrics can match byte for
byte) and merged back into the history; curves drawn for the metrics that have values."""

import math

from rlkit.run import outputs


def test_metrics_are_written_line_by_line_with_timings_apart_and_nan_as_null(tmp_path):
    metrics, timings = tmp_path / "metrics.jsonl", tmp_path / "timings.jsonl"
    writer = outputs.MetricsWriter(metrics, timings)
    writer.write({"step": -1, "sft/final_loss": 0.5, "time/warmup": 3.0})
    assert len(metrics.read_text().splitlines()) == 1  # flushed before the next record
    writer.write({"step": 0, "reward/mean": math.nan, "train/loss": math.inf, "time/step": 1.5})
    writer.write({"step": 1, "reward/mean": 0.25})
    writer.close()
    assert metrics.read_text().splitlines() == [
        '{"sft/final_loss": 0.5, "step": -1}',
        '{"reward/mean": null, "step": 0, "train/loss": null}',
        '{"reward/mean": 0.25, "step": 1}',
    ]
    assert outputs.read_jsonl(timings) == [
        {"step": -1, "time/warmup": 3.0},
        {"step": 0, "time/step": 1.5},
    ]
    assert outputs.read_history(metrics, timings) == [
        {"step": 0, "reward/mean": None, "train/loss": None, "time/step": 1.5},
        {"step": 1, "reward/mean": 0.25},
    ]


def test_curves_are_drawn_for_metrics_with_finite_values_only(tmp_path):
    empty = [{"step": 0, "reward/mean": None, "train/loss": math.nan}]
    assert outputs.plot_curves(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    records = [{"step": s, "reward/mean": s / 4, "eval/accuracy/n2": 0.5} for s in range(3)]
    assert outputs.plot_curves(records, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 1000
