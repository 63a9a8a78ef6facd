"""benchmarks/training_table.py: issue 11's table, read from the recovery runs' committed logs."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_table():
    spec = importlib.util.spec_from_file_location("training_table", REPO / "benchmarks" / "training_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_newest_run_of_each_recipe_is_read_from_its_logs():
    table = load_table()
    rows = {row["recipe"]: row for row in table.newest_runs()}
    # A recipe run in several sessions is reported from the newest (window-lowrank-12: eager in 11, 12 and 14).
    window = rows["window-lowrank-12"]
    assert (window["folder"], window["compile"], window["loss"]) == ("session15", "layers", "KD")
    assert 119_000 < window["tokens_per_s"] < 121_000 and window["steps"] == 400
    assert rows["finetuned-original-corpus-long"]["loss"] == "CE"
    assert all(row["peak_gib"] > 0 and 0 < row["kv_fraction"] <= 1 for row in rows.values())


def test_verdicts_name_what_missed():
    verdict = load_table().verdict
    kd = {"loss": "KD", "kv_fraction": 0.25, "tokens_per_s": 100_000, "peak_gib": 40.0}
    assert verdict(kd) == "met"
    assert verdict({**kd, "tokens_per_s": 99_999, "peak_gib": 40.5}) == "< 100k tokens/s, > 40 GiB"
    ce = {"loss": "CE", "kv_fraction": 1.0, "tokens_per_s": 135_000, "peak_gib": 30.0}
    assert verdict(ce) == "missed by 10%"
    assert verdict({**ce, "kv_fraction": 0.5}) == ""  # no target for cross-entropy on a compressed model
