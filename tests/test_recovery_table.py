"""benchmarks/recovery_table.py: issue 10's table, read from the recovery runs' committed results."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_table():
    sys.path.insert(0, str(REPO / "benchmarks"))  # its sibling training_table
    spec = importlib.util.spec_from_file_location("recovery_table", REPO / "benchmarks" / "recovery_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_recipe_is_its_newest_scored_run_against_the_original_and_the_targets():
    original, rows = load_table().table_rows()
    assert round(original["perplexity"]["perplexity"], 2) == 35.87
    rows = {row["recipe"]: row for row in rows}
    met = rows["lowrank-25-int8-8min"]  # session 17: +4.5% in 403 s, passkey 20/20/16 (session 16's run: 477 s)
    assert (met["folder"], met["seconds"], met["verdict"], met["steps"]) == ("session17", 403, "met", 1500)
    assert met["passkey"] == {"2048": 20, "4096": 20, "8192": 16} and met["kv_bytes"] == 5752
    assert round(met["after_surgery"], 2) == 50.27 and round(met["tokens"] / 1e6, 1) == 49.2
    assert rows["lowrank-12-int4-4k-8min"]["verdict"] == "missed by 0.3 points"
    assert rows["lowrank-12-int4-4k-greedy-8min"]["verdict"] == "met"  # session 17: +9.2% in 434 s
    assert rows["lowrank-12-int4-long-4k"]["verdict"] == "met, 753 s > 8 min"
    assert rows["finetuned-original-corpus"]["vs_baseline"] == 0 and rows["finetuned-original"]["target"] is None
    assert "original" not in rows


def test_a_cache_is_held_to_the_target_of_the_smallest_budget_it_fits():
    target_for = load_table().target_for
    assert [target_for(f) for f in (0.048, 0.125, 0.2497, 0.333, 0.5, 0.75)] == [0.10, 0.10, 0.05, 0.02, 0.02, None]


def test_the_committed_table_is_what_the_committed_results_give(capsys):
    load_table().main([])
    assert capsys.readouterr().out in (REPO / "docs/results/recovery-h200/TABLE.md").read_text()
