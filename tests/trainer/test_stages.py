"""Staged recovery (training.stages), the loss's logged parts and the KV budget in the run's records.

The runs are the tiny compressed model of configs/tiny-compressed.yaml (every compression method at once), trained
in this process as a world of one by launch/train.py's main(): 2 steps training only what surgery created or
changed, then 2 steps training everything. Weights are compared checkpoint to checkpoint, in fp32, so a frozen
parameter must come back bit for bit.
"""

import json
from pathlib import Path

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

from kvforge.trainer.config import ConfigError, load_config
from kvforge.trainer.tracking import read_metrics
from kvforge.trainer.export_run import consolidate_checkpoint
from kvforge.trainer.stages import plan_stages, stage_at
from kvforge.trainer.train import NEW_PARAMETERS_FILE, lr_at

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny-llama.yaml"
COMPRESSED = REPO / "configs/tiny-compressed.yaml"
STAGES = "training.stages=[{steps: 2, train: new}, {steps: 2, train: all}]"
# Every step checkpointed and kept, to compare the weights step by step; distillation at T = 2 so that the
# temperature shows in the logged parts.
RUN = ["training.max_steps=4", STAGES, "training.warmup_steps=2", "training.distill_temperature=2.0",
       "checkpoint.save_every=1", "checkpoint.keep_last=10", "checkpoint.export_hf=false", "logging.wandb=disabled",
       "eval.at_start=false"]


def run(main, run_dir, *overrides, fault=None):
    with pytest.MonkeyPatch.context() as mp:
        if fault:
            mp.setenv("KVFORGE_FAULT", fault)
        rc = main(["--config", str(COMPRESSED), f"run.output_dir={run_dir}", *RUN, *overrides])
    assert rc == 0, f"launch/train.py returned {rc}"


def weights_at(run_dir: Path, step: int, zero_stage: int) -> dict[str, torch.Tensor]:
    if step == 0:
        return load_file(run_dir / "compressed_init/model.safetensors")
    return consolidate_checkpoint(run_dir / f"checkpoints/step_{step:08d}", zero_stage)


def changed(before: dict, after: dict) -> set[str]:
    return {name for name, tensor in after.items() if name in before and not torch.equal(before[name], tensor)}


# ---------------------------------------------------------------------------------------------------
# Config and schedule, no model


def test_stages_must_fit_the_run():
    with pytest.raises(ConfigError, match=r"'training.stages' = \['2 x new', '2 x all'\]: expected steps adding up "
                                          r"to training.max_steps \(6\), not 4"):
        load_config(COMPRESSED, [STAGES])
    with pytest.raises(ConfigError, match=r"'training.stages\[0\].train' = 'new': expected 'all' without a "
                                          "compression section"):
        load_config(TINY, ["training.stages=[{steps: 8, train: new}]"])
    with pytest.raises(ConfigError, match=r"'training.stages\[0\].train' = 'new\+lora': expected 'new' or 'all' "
                                          r"when training.lora.r = 0"):
        load_config(COMPRESSED, ["training.stages=[{steps: 6, train: new+lora}]"])
    with pytest.raises(ConfigError, match=r"'training.stages' in override .*: entry 1 has the unknown key 'step' "
                                          r"\(known keys: steps, train, lr\); did you mean 'steps'\?"):
        load_config(COMPRESSED, ["training.stages=[{steps: 3, train: new}, {step: 3, train: all}]"])
    with pytest.raises(ConfigError, match=r"'training.warmup_steps' = 2: expected at most the steps of every stage "
                                          r"\(training.stages\[0\].steps = 1\)"):
        load_config(COMPRESSED, ["training.warmup_steps=2", "training.stages=[{steps: 1, train: new}, "
                                 "{steps: 5, train: all}]"])


def test_each_stage_runs_its_own_schedule_and_no_stages_change_nothing():
    plain = load_config(COMPRESSED, ["training.max_steps=10", "training.warmup_steps=2"])
    # Without stages: warmup over 2 steps, then cosine from lr to lr * min_lr_ratio at max_steps, as always.
    lr, floor = plain.training.lr, plain.training.lr * plain.training.min_lr_ratio
    assert [lr_at(s, plain) for s in (0, 1, 2)] == [lr / 2, lr, lr]
    assert lr_at(10, plain) == pytest.approx(floor)
    staged = load_config(COMPRESSED, ["training.max_steps=10", "training.warmup_steps=2",
                                      "training.stages=[{steps: 4, train: new}, {steps: 6, train: all}]"])
    stages = plan_stages(staged)
    assert [(s.start, s.end, s.train) for s in stages] == [(0, 4, "new"), (4, 10, "all")]
    assert [stage_at(stages, s).index for s in range(11)] == [0] * 4 + [1] * 7
    # Stage 2 warms up again from its first step and decays to the floor at its own end.
    assert [lr_at(s, staged) for s in (0, 1, 4, 5)] == [lr / 2, lr, lr / 2, lr]
    assert lr_at(3, staged) > floor and lr_at(10, staged) == pytest.approx(floor)
    # A stage's own peak learning rate scales its whole schedule; the stage without one keeps training.lr.
    own = load_config(COMPRESSED, ["training.max_steps=10", "training.warmup_steps=2",
                                   "training.stages=[{steps: 4, train: new, lr: 0.01}, {steps: 6, train: all}]"])
    assert [lr_at(s, own) for s in (0, 1, 4, 5)] == [0.005, 0.01, lr / 2, lr]
    assert lr_at(3, own) == pytest.approx(0.01 * lr_at(3, staged) / lr)
    with pytest.raises(ConfigError, match=r"'training.stages\[1\].lr' = -0.1: expected a positive learning rate"):
        load_config(COMPRESSED, ["training.stages=[{steps: 3, train: new}, {steps: 3, train: all, lr: -0.1}]"])


# ---------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def staged_run(launcher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged") / "run"
    run(launcher, run_dir)
    return run_dir


def test_new_parameters_are_what_surgery_created_or_changed(staged_run):
    new = set(json.loads((staged_run / "compressed_init" / NEW_PARAMETERS_FILE).read_text()))
    attention = "model.layers.{}.self_attn.{}.weight"
    expected = {attention.format(0, name) for name in ("k_down", "k_up", "v_down", "v_up")}  # low-rank latents
    expected |= {f"model.layers.0.self_attn.{name}.bias" for name in ("v_down", "v_up")}  # centred values
    expected |= {attention.format(1, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}  # merged heads
    expected |= {attention.format(2, name) for name in ("q_proj", "o_proj")}  # reads layer 1's merged cache
    # Layer 3 reuses layer 0's probabilities with its own, unchanged v_proj / o_proj: nothing new there.
    assert new == expected


def test_each_stage_changes_only_its_parameters(staged_run):
    new = set(json.loads((staged_run / "compressed_init" / NEW_PARAMETERS_FILE).read_text()))
    weights = [weights_at(staged_run, step, zero_stage=2) for step in range(5)]
    for step in (1, 2):  # train: new
        assert changed(weights[step - 1], weights[step]) == new, step
    for step in (3, 4):  # train: all (the new parameters too)
        moved = changed(weights[step - 1], weights[step])
        assert new < moved and "model.layers.3.mlp.down_proj.weight" in moved, step
        assert "model.embed_tokens.weight" in moved and "model.norm.weight" in moved, step


def test_stage_boundary_lands_on_the_configured_step_and_the_lr_restarts(staged_run):
    records = read_metrics(staged_run, "train/lr")
    assert [records[s]["train/stage"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    lr = load_config(COMPRESSED).training.lr
    # warmup_steps=2 in each stage (a fresh optimizer's first Adam steps are as large as the learning rate).
    assert [records[s]["train/lr"] for s in (1, 2, 3, 4)] == [lr / 2, lr, lr / 2, lr]


def test_logged_parts_make_up_the_loss_and_the_kv_budget_is_recorded(staged_run):
    records = read_metrics(staged_run, "train/lr")
    w, T = 0.5, 2.0  # tiny-compressed.yaml's distill_weight, RUN's temperature
    for step, record in records.items():
        assert record["train/ce"] > 0 and record["train/kl"] > 0, record
        total = (1 - w) * record["train/ce"] + w * T**2 * record["train/kl"]
        assert total == pytest.approx(record["train/loss"], rel=1e-6), step
    budget = read_metrics(staged_run, "model/kv_fraction")[0]
    # 4 layers x 2 KV heads x 16 dims: K and V, 2 bytes each (bf16) -> 512 bytes/token originally. Cached now:
    # layer 0 latents 12 + 12; layers 1-2 are windows (constant, not per token); layer 3 reuses probabilities and
    # caches its values, 2 x 16.
    assert budget["model/kv_bytes_per_token_original"] == 512
    # layer 0's latents in 8 bits (a byte each, two bf16 scales), the merged window layer's K and V in bf16
    assert budget["model/kv_bytes_per_token"] == (12 + 12) + 2 * 2 + 2 * 16 * 2
    assert budget["model/kv_fraction"] == pytest.approx(92 / 512)


def test_a_run_preempted_inside_a_stage_and_at_its_boundary_resumes_as_the_uninterrupted_one(
        launcher, staged_run, tmp_path):
    run_dir = tmp_path / "run"
    run(launcher, run_dir, fault="sigterm:1")  # stops after step 1: inside stage 1
    assert sorted(read_metrics(run_dir, "train/lr")) == [1]
    run(launcher, run_dir, fault="sigterm:2")  # resumes step 1's checkpoint whole, stops at the boundary
    assert sorted(read_metrics(run_dir, "train/lr")) == [1, 2]
    run(launcher, run_dir)  # stage 2 starts from the boundary checkpoint's weights
    reference, resumed = read_metrics(staged_run, "train/lr"), read_metrics(run_dir, "train/lr")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in resumed:
        assert resumed[step]["train/stage"] == reference[step]["train/stage"], step
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], abs=1e-6), step
    assert changed(weights_at(staged_run, 4, 2), weights_at(run_dir, 4, 2)) == set()


def test_under_zero3_each_stage_changes_only_its_parameters(launcher, tmp_path):
    """ZeRO-3 partitions every parameter, frozen or not, and loads the boundary's weights into the partitioned
    model of stage 2 (gathered parameter by parameter)."""
    run_dir = tmp_path / "run"
    run(launcher, run_dir, "deepspeed.zero_stage=3", "checkpoint.save_every=2")
    new = set(json.loads((run_dir / "compressed_init" / NEW_PARAMETERS_FILE).read_text()))
    start, boundary, end = (weights_at(run_dir, step, zero_stage=3) for step in (0, 2, 4))
    assert changed(start, boundary) == new
    moved = changed(boundary, end)
    assert new < moved and {"model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight"} <= moved


def test_new_plus_lora_trains_the_new_parameters_and_the_adapters_then_all_trains_the_base_too(launcher, tmp_path):
    run_dir = tmp_path / "run"
    run(launcher, run_dir, "training.lora.r=4", "training.stages=[{steps: 2, train: new+lora}, {steps: 2, train: all}]",
        "checkpoint.save_every=2")
    new = {f"base_model.model.{name}".replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
           for name in json.loads((run_dir / "compressed_init" / NEW_PARAMETERS_FILE).read_text())}
    boundary, end = weights_at(run_dir, 2, zero_stage=2), weights_at(run_dir, 4, zero_stage=2)
    adapters = {name for name in boundary if ".lora_" in name}
    # LoRA's B matrices start at zero: every one that moved was trained in stage 1.
    assert adapters and all(boundary[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)
    start = {f"base_model.model.{name}": tensor
             for name, tensor in load_file(run_dir / "compressed_init/model.safetensors").items()}
    base = {name: tensor for name, tensor in boundary.items() if name not in adapters}
    renamed = {name.replace(".base_layer.", "."): tensor for name, tensor in base.items()}
    # (lm_head is embed_tokens, saved once in compressed_init.)
    assert {name for name, t in renamed.items() if name in start and not torch.equal(t, start[name])} == \
        {name.replace(".base_layer.", ".") for name in new}
    moved = changed(boundary, end)
    assert "base_model.model.model.layers.3.mlp.down_proj.base_layer.weight" in moved and adapters & moved


@pytest.mark.distributed
def test_two_ranks_stage_into_a_frozen_stage_and_export(tmp_path):
    """deepspeed --num_gpus 2 (gloo ranks, ZeRO-2): everything first, then only the new parameters. Both ranks
    load the boundary's weights; the export holds the frozen parameters exactly as the boundary left them."""
    import os
    import subprocess
    import sys

    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KVFORGE_FAULT"):
        env.pop(key, None)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch/train.py"), "--config", str(COMPRESSED), f"run.output_dir={run_dir}",
           "training.stages=[{steps: 3, train: all}, {steps: 3, train: new}]", "checkpoint.keep_last=2",
           "logging.wandb=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    records = read_metrics(run_dir, "train/lr")
    assert [records[s]["train/stage"] for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert all("train/ce" in r and "train/kl" in r for r in records.values())
    new = set(json.loads((run_dir / "compressed_init" / NEW_PARAMETERS_FILE).read_text()))
    boundary = weights_at(run_dir, 3, zero_stage=2)
    exported = dict(KVForgeForCausalLM.from_pretrained(run_dir / "hf_model").named_parameters())
    assert {name for name, p in exported.items() if not torch.equal(p.detach(), boundary[name])} == new


def test_zero_buffers_start_every_parameter_on_a_16_byte_boundary():
    """ZeRO-2 packs an optimizer group's parameters back to back: a bias of 12 bf16 values (24 bytes) would put every
    later parameter off alignment, which compiled layers assume (session 14's "misaligned address"). param_groups
    gives such a parameter a group of its own; the packing DeepSpeed makes of one plain group shows the fault."""
    import deepspeed

    from kvforge.trainer.runtime import init_distributed
    from kvforge.trainer.stages import misaligned_parameters, param_groups

    init_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}

    def engine(groups_of):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 16),
                                    torch.nn.LayerNorm(16))
        optimizer = torch.optim.AdamW(groups_of(model), lr=1e-3)
        built, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return built

    packed_as_one = engine(lambda model: model.parameters())
    # Offsets in values: 0.bias ends at 204, so 1.weight starts 8 bytes off, 1.bias (216) on, then 2.weight (228)
    # and every later one off.
    assert misaligned_parameters(packed_as_one.module) == ["1.weight", "2.weight", "2.bias", "3.weight", "3.bias"]
    aligned = engine(lambda model: param_groups(model, 0.1))
    assert misaligned_parameters(aligned.module) == []
    groups = param_groups(aligned.module, 0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1), (3, 0.0), (1, 0.0), (1, 0.0), (1, 0.0)]
    assert [(len(g["params"]), "weight_decay" in g) for g in param_groups(aligned.module)][0] == (2, False)
