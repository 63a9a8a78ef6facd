"""The config tree: merging, `auto` resolution, and an error that names the key for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_scripts import load_launch_script

from kvforge.trainer.config import DEFAULT_DEEPSPEED, ConfigError, load_config, resolve_deepspeed, to_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, tmp_path, monkeypatch):
    # A recipe that trains on a packed corpus names it by $KVFORGE_CORPUS / $KVFORGE_PROSE (lowrank-25-corpus.yaml,
    # lowrank-25-prose.yaml); the paths must exist for the config to validate.
    corpora = {}
    for variable in ("KVFORGE_CORPUS", "KVFORGE_PROSE"):
        corpora[variable] = tmp_path / f"{variable}.jsonl"
        corpora[variable].write_text('{"text": "a document"}\n')
        monkeypatch.setenv(variable, str(corpora[variable]))
    cfg = load_config(path)
    resolved = json.dumps(to_dict(cfg))
    assert str(corpora["KVFORGE_CORPUS"]) in resolved or path.name != "lowrank-25-corpus.yaml"
    assert str(corpora["KVFORGE_PROSE"]) in resolved or path.name != "lowrank-25-prose.yaml"
    ds = resolve_deepspeed(cfg, world_size=2)
    assert "auto" not in json.dumps(ds)


def test_a_recipe_merges_into_its_base_and_bad_bases_are_named(tmp_path):
    recipe = load_config(REPO / "configs/recovery/lowrank-50.yaml")
    assert recipe.compression.arguments["budget"] == 0.5 and recipe.run.name == "smollm2-lowrank-50"
    assert recipe.data.teacher_samples.tokens == load_config(REPO / "configs/recovery/base.yaml").data.teacher_samples.tokens
    assert load_config(REPO / "configs/recovery/finetuned-original.yaml").compression is None
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntraining: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml' \(the base of .*c.yaml\) does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: c.yaml\ntraning: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="traning"):
        load_config(tmp_path / "d.yaml")


def test_file_then_overrides_win():
    cfg = load_config(REPO / "configs/tiny-llama.yaml", ["training.lr=0.5", "run.name=x", "model.config.hidden_size=32"])
    assert cfg.training.lr == 0.5
    assert cfg.model.config["hidden_size"] == 32
    assert cfg.model.config["num_hidden_layers"] == 2  # the file's other overrides survive
    assert cfg.run.output_dir == "runs/tiny-llama"  # set in the file, so the interpolation is not used


def test_output_dir_follows_run_name_by_default():
    assert load_config(None, ["run.name=abc"]).run.output_dir == "runs/abc"


def test_auto_values_come_from_training():
    cfg = load_config(None, ["training.micro_batch_size=3", "training.grad_accum=5", "training.grad_clip=0.5",
                             "training.precision=bf16", "deepspeed.zero_stage=3"])
    ds = resolve_deepspeed(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3


def test_an_inline_deepspeed_setting_adds_to_the_default_config():
    cfg = load_config(None, ["deepspeed.zero_stage=3",
                             "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=1000000"])
    ds = resolve_deepspeed(cfg, world_size=2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1000000
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["steps_per_print"] == DEFAULT_DEEPSPEED["steps_per_print"]  # the rest of the default stays
    assert ds["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch_size


def test_deepspeed_json_file_with_auto_and_optimizer(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 1},
                             "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}))
    cfg = load_config(None, [f"deepspeed.config={f}", "training.lr=0.001", "training.micro_batch_size=2",
                             "training.grad_accum=3"])
    ds = resolve_deepspeed(cfg, world_size=4)
    assert ds["train_batch_size"] == 24
    assert ds["optimizer"]["params"]["lr"] == 0.001
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["training.lrr=1"], "unknown config key 'training.lrr' in override 'training.lrr=1'; did you mean 'training.lr'?"),
    (["trainig.max_steps=1"], "did you mean 'training'?"),
    (["training.max_steps=abc"], "config key 'training.max_steps': Value 'abc'"),
    (["training.max_steps=0"], "config key 'training.max_steps' = 0: expected a positive integer"),
    (["model.name=/does/not/exist"], "config key 'model.name' = '/does/not/exist': the path does not exist"),
    (["data.source=/no/such/corpus"], "config key 'data.source' = '/no/such/corpus': the path does not exist"),
    (["deepspeed.zero_stage=5"], "config key 'deepspeed.zero_stage' = 5: expected a ZeRO stage in 0, 1, 2, 3"),
    (["training.precision=bf61"], "expected one of bf16, fp16, fp32 (did you mean 'bf16'?)"),
    (["training.schedule=cosin"], "did you mean 'cosine'?"),
    (["data.eval_fraction=1.5"], "config key 'data.eval_fraction' = 1.5"),
    (["training.warmup_steps=500", "training.max_steps=10"], "at most training.max_steps (10)"),
    (["deepspeed.offload_param=true", "deepspeed.zero_stage=2"], "needs stage 3"),
    (["model.config.hidden_size=8"], "only makes sense with model.init=random"),
    (["training"], "must look like key.sub=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_deepspeed_value_contradicting_training(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu' = 8 contradicts training \(4\)"):
        load_config(None, [f"deepspeed.config={f}"])


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'training.max_stepz' in .*did you mean 'training.max_steps'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    section = tmp_path / "section.yaml"
    section.write_text("training: 3\n")
    with pytest.raises(ConfigError, match="'training' in .* must be a section"):
        load_config(section)


def test_launcher_reports_config_errors_without_a_traceback():
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/tiny-llama.yaml"),
                           "deepspeed.zero_stage=5"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 2
    assert "config error: config key 'deepspeed.zero_stage' = 5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_resolved_deepspeed():
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/tiny-llama.yaml"),
                           "--dry-run", "training.micro_batch_size=7"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "train_micro_batch_size_per_gpu: 7" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("compression.layers.1.window=-3", "addresses a list element by index"),
    ("compression.layers=[{attention: window, window: -3}, {}, {}, {}]", "compression.layers[0].window=-3 is out of range"),
    ("compression.layers=[{}, {}, {}]", "4"),  # layer count differs from the model's
    ("model.name=nobody/no-such-model", "could not be fetched from the Hugging Face hub (offline?)"),
])
def test_launcher_checks_model_and_compression_before_loading_weights(override, message):
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/tiny-compressed.yaml"),
                           "--dry-run", override], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_teacher_computes_in_the_training_precision_unless_told():
    from kvforge.trainer.train import teacher_dtype

    tiny = REPO / "configs/tiny-llama.yaml"
    assert teacher_dtype(load_config(tiny, ["training.precision=bf16"])) == "bfloat16"
    assert teacher_dtype(load_config(tiny, ["training.precision=fp32", "model.dtype=float32"])) == "float32"
    assert teacher_dtype(load_config(tiny, ["training.precision=bf16", "training.teacher_dtype=float32"])) == "float32"
    with pytest.raises(ConfigError, match="training.teacher_dtype.*one of auto, float32"):
        load_config(tiny, ["training.teacher_dtype=fp8"])


@pytest.mark.parametrize("recipe, fraction", [("lowrank-50", 0.5), ("lowrank-25", 0.25), ("lowrank-12", 0.125),
                                              ("partial-rope-25", 0.25), ("merged-heads-33", 1 / 3),
                                              ("mixattention-ma", None), ("shared-attention", None),
                                              ("window-lowrank-12", None), ("lowrank-50-int8", 0.5), ("lowrank-25-int8-long", 0.25),
                                              ("lowrank-12-int8-long", 0.125), ("window-lowrank-12-int8-long", None),
                                              ("lowrank-12-int4-long", 0.125), ("lowrank-12-int4-long-unbalanced", 0.125),
                                              ("lowrank-12-int4-long-4k", 0.125), ("lowrank-12-int4-long-aligned", 0.125),
                                              ("lowrank-25-int8-long-aligned", 0.25), ("lowrank-25-int8-8min", 0.25),
                                              ("lowrank-12-int4-4k-8min", 0.125),
                                              ("partial-rope-50", 0.5),
                                              ("partial-rope-12-int8", 0.125)])
def test_every_recovery_recipe_compresses_smollm2_as_it_says(recipe, fraction, monkeypatch, tmp_path):
    """Each recipe's compression section parses against the real model's config (no weights), and the fixed
    budgets are what the name says (the rest are re-spent or chosen by surgery from calibration data)."""
    from kvforge.models.loading import config_for

    corpus = tmp_path / "corpus.jsonl"  # the corpus recipes' packed documentation (pack_corpus.py) is a GPU-side file
    corpus.write_text('{"text": "a document"}\n')
    monkeypatch.setenv("KVFORGE_CORPUS", str(corpus))
    cfg = load_config(REPO / f"configs/recovery/{recipe}.yaml")
    assert cfg.eval.heldout and cfg.compression.calibration.source == "stdlib-docstrings"
    spec = cfg.compression.spec_for(config_for(cfg.model.name))
    assert len(spec.layers) == 30
    if fraction is not None:
        dense = 30 * 2 * 3 * 64 * 2
        assert spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == pytest.approx(
            fraction * dense, rel=0.01)
    bits = 8 if "int8" in recipe else 4 if "int4" in recipe else None
    assert all(layer.cache_bits == bits for layer in spec.layers)


@pytest.mark.parametrize("override, message", [
    ("compression.surgery.rank_alocation=greedy",
     "compression.surgery.rank_alocation: unknown key; did you mean 'rank_allocation'?"),
    ("compression.prest=low-rank", "compression.prest: unknown key; did you mean 'preset'?"),
    ("compression.surgery.budget_fraction=0.5",
     "compression.surgery.budget_fraction = 0.5 and compression.arguments.budget = 0.25 disagree"),
])
def test_compression_keys_and_the_two_budget_spellings_fail_in_load_config_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/smollm2-recover.yaml", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    # The same budget in both spellings is one budget.
    cfg = load_config(REPO / "configs/smollm2-recover.yaml", ["compression.surgery.budget_fraction=0.25"])
    assert cfg.compression.budget == cfg.compression.surgery.budget_fraction == cfg.compression.arguments["budget"] == 0.25


def test_the_compression_section_is_parsed_once_and_written_back_as_given(monkeypatch, tmp_path):
    """load_config parses the section into a CompressionConfig; the launcher's early check (and the trainer) take that
    object, and config.yaml keeps the section as the file gave it (a resume signature never changes with a parse)."""

    from kvforge.models.loading import config_for
    from kvforge.models.surgery import CompressionConfig
    from kvforge.trainer.config import save_resolved, to_dict

    parses = []
    original = CompressionConfig.from_section.__func__
    monkeypatch.setattr(CompressionConfig, "from_section",
                        classmethod(lambda cls, section: parses.append(section) or original(cls, section)))
    cfg = load_config(REPO / "configs/recovery/lowrank-25.yaml")
    load_launch_script("train").check_model_and_compression(cfg)
    assert len(parses) == 1
    written = {"calibration": {"source": "stdlib-docstrings", "tokens": 65536, "seq_len": 2048}, "preset": "low-rank",
               "arguments": {"budget": 0.25}, "surgery": {"rank_allocation": "greedy", "rank_multiple": 1}}
    assert to_dict(cfg)["compression"] == written
    save_resolved(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml"))["compression"] == written
    assert cfg.compression.spec_for(config_for(cfg.model.name)).to_dict() == \
        CompressionConfig.from_section(written).spec_for(config_for(cfg.model.name)).to_dict()
