"""metrics.jsonl, the run's own record: read back as a resumed or crashed run left it; and a run that would log to
W&B without wandb installed stops at once, not after minutes of startup."""

import importlib.util
import json

import pytest

from kvforge.trainer import train as train_module
from kvforge.trainer.config import Config, ConfigError
from kvforge.trainer.tracking import check_wandb_installed, read_metrics


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


@pytest.fixture
def no_wandb(monkeypatch, tmp_path):
    """wandb not installed, no key, no login, no WANDB_MODE: logging.wandb=auto resolves to offline."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb"
                        else find_spec(name, *a, **k))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.parametrize("mode, shown", [("offline", "'offline'"), ("online", "'online'"),
                                         ("auto", "'auto' (resolved to 'offline')")])
def test_logging_to_wandb_without_wandb_installed_names_the_mode_and_the_way_out(no_wandb, mode, shown):
    with pytest.raises(ConfigError) as e:
        check_wandb_installed(mode)
    assert str(e.value) == (f"logging.wandb={shown} needs the wandb package, which is not installed: pip install "
                            "wandb (it is in requirements.lock), or set logging.wandb=disabled")


def test_disabled_needs_no_wandb(no_wandb, monkeypatch):
    check_wandb_installed("disabled")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # what the GPU session scripts set, with logging.wandb=auto
    check_wandb_installed("auto")


def test_with_wandb_installed_any_mode_passes(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    for mode in ("online", "offline", "disabled"):
        check_wandb_installed(mode)


def test_train_fails_on_missing_wandb_before_anything_starts(no_wandb, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("train() went past the wandb check")

    monkeypatch.setattr(train_module, "init_distributed", started)
    monkeypatch.setattr(train_module, "resolve_deepspeed", started)
    cfg = Config()
    cfg.logging.wandb = "offline"
    with pytest.raises(ConfigError, match=r"logging.wandb='offline' needs the wandb package"):
        train_module.train(cfg)
