"""eval.heldout: a run scores sources it never trains on at every eval, as launch/evaluate.py scores them."""

import contextlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvforge.trainer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-llama.yaml"


def prose_folder(root: Path) -> Path:
    """Plain text files without a suffix (as Debian's fortunes): one document each."""
    words = ("the river ran past an old mill where children played every summer while their parents argued about "
             "the price of bread and the weather of next week").split()
    rng = random.Random(0)
    root.mkdir()
    for i in range(8):
        (root / f"story{i}").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(6)))
    return root


def test_a_heldout_source_is_scored_at_start_and_end_and_the_export_scores_the_same(launcher, tmp_path):
    from kvforge.trainer.tracking import read_metrics

    prose = prose_folder(tmp_path / "prose")
    run_dir = tmp_path / "run"
    args = ["--config", str(TINY), f"run.output_dir={run_dir}", "training.max_steps=4", "training.eval_every=0",
            "eval.at_start=true", f"eval.heldout=[{prose}]", "eval.heldout_fraction=0.5", "logging.wandb=disabled",
            "checkpoint.resume=never", "checkpoint.save_every=0", f"data.cache_dir={tmp_path / 'cache'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert launcher(args) == 0, out.getvalue()[-3000:]
    assert "step 0: eval loss" in out.getvalue() and "held-out perplexity: prose " in out.getvalue()
    metrics = read_metrics(run_dir, "eval/heldout/prose/perplexity")
    assert sorted(metrics) == [0, 4]
    first, last = metrics[0]["eval/heldout/prose/perplexity"], metrics[4]["eval/heldout/prose/perplexity"]
    assert first != last
    # The exported model, in a fresh process, on the same source with the same split: the run's number.
    result = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--task", "perplexity", "--model",
                           str(run_dir / "hf_model"), "--data", str(prose), "--eval-fraction", "0.5", "--seq-len",
                           "64", "--batch-size", "2", "--max-batches", "2", "--cache-dir", str(tmp_path / "cache"),
                           "--device", "cpu", "--json", str(result)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(result.read_text())["perplexity"] == pytest.approx(last, rel=2e-3)


def test_a_heldout_source_the_run_trains_on_is_refused():
    with pytest.raises(ConfigError, match=r"eval.heldout\[0\].*'stdlib-docstrings'.*does not train on"):
        load_config(TINY, ["eval.heldout=[stdlib-docstrings]"])
    with pytest.raises(ConfigError, match="eval.heldout_fraction"):
        load_config(TINY, ["eval.heldout_fraction=1.0"])
