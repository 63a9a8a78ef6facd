"""metrics.jsonl, the run's own record: read back as a resumed or crashed run left it."""

import json

from kvforge.trainer.tracking import read_metrics


def test_the_last_record_of_a_redone_step_wins_and_a_cut_line_is_skipped(tmp_path):
    lines = [{"step": 1, "train/lr": 1.0, "train/loss": 3.0}, {"step": 2, "train/lr": 0.9, "train/loss": 2.5},
             {"step": 2, "eval/loss": 2.4}, {"step": 2, "train/lr": 0.9, "train/loss": 2.6},  # redone after resume
             {"step": 3, "train/lr": 0.8, "train/loss": 2.2}]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 4, "train/l'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    train = read_metrics(tmp_path, "train/lr")
    assert sorted(train) == [1, 2, 3] and train[2]["train/loss"] == 2.6
    assert read_metrics(tmp_path, "eval/loss") == {2: {"step": 2, "eval/loss": 2.4}}
    assert read_metrics(tmp_path / "missing", "train/lr") == {}
