"""Faults that need two ranks, through the real launcher (`deepspeed --num_gpus 2`, gloo on CPU).

Four launches (~45-60 s each on 2 cores) hold all of it:

  reference   6 steps, ZeRO-2 with gradient accumulation 2; rank 1's loss is NaN in step 2, rank 0's
              is not. Checkpoints after every step.
  preempted   the same run; at the start of step 2 both ranks stall until the test sends SIGTERM to
              the rank processes (what a scheduler does to a job), then checkpoint at the end of step 2.
  resumed     `checkpoint.resume=auto` on the preempted run: steps 3-6 must equal the reference.
  zero3_lora  LoRA under ZeRO-3 on a small pretrained model, with a NaN step on rank 0: the adapter
              and the merged export must reproduce the logits the trained engine computed.

The deepspeed launcher's own behaviour on a signal is documented in README ("Reliability"): sent to
the launcher, SIGTERM makes it terminate the ranks (which checkpoint, as here) and exit 1 itself;
its exit code comes from the ranks only when they exit by themselves, which is what this test does.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kvforge.trainer import checkpoint as ckpt
from kvforge.trainer.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train_distributed import DEEPSPEED, REPO, free_port, wandb_records  # noqa: E402

pytestmark = pytest.mark.distributed

TINY = REPO / "configs/tiny-llama.yaml"
COMMON = ["training.max_steps=6", "checkpoint.save_every=1", "checkpoint.keep_last=6", "training.eval_every=0",
          "checkpoint.export_hf=false"]
NAN_ON_RANK1 = "nan_loss:2@1"


def command(run_dir: Path, *overrides: str, config: Path = TINY) -> list[str]:
    return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
            "--config", str(config), f"run.output_dir={run_dir}", *overrides]


def environment(fault: str = "", **extra: str) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("KVFORGE_FAULT", None)
    if fault:
        env["KVFORGE_FAULT"] = fault
    return env


def launch(run_dir: Path, *overrides: str, fault: str = "", config: Path = TINY, **extra: str):
    proc = subprocess.run(command(run_dir, *overrides, config=config), cwd=REPO, env=environment(fault, **extra),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the last training record logged for it."""
    return read_metrics(run_dir, "train/lr")


def optimizer_state(step_dir: Path, rank: int) -> dict:
    return torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False,
                      map_location="cpu")["optimizer_state_dict"]


def model_states(step_dir: Path) -> dict:
    return torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    output = launch(run_dir, *COMMON, fault=NAN_ON_RANK1)
    return run_dir, output


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """The reference run, stopped by SIGTERM to both rank processes while they are in step 2."""
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    log = run_dir.parent / "launcher.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command(run_dir, *COMMON), cwd=REPO, env=environment(f"{NAN_ON_RANK1},stall:2"),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            pids, deadline = {}, time.monotonic() + 600
            while len(pids) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                for rank, pid in re.findall(r"rank (\d) \(pid (\d+)\) stalls in step 2", log.read_text()):
                    pids[int(rank)] = int(pid)
                time.sleep(0.5)
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return run_dir, returncode, log.read_text()


@pytest.fixture(scope="module")
def resumed(preempted):
    run_dir, returncode, _ = preempted
    assert returncode == 0
    output = launch(run_dir, *COMMON)  # checkpoint.resume=auto is the default
    return run_dir, output


def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(reference):
    run_dir, output = reference
    assert ("step 2: skipped, non-finite loss on rank(s) 1; weights and optimizer state unchanged "
            "(1 bad step(s) in a row, at most 5; 1 skipped in all)") in output
    logged = metrics(run_dir)
    assert [logged[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 1, 1, 1, 1]
    assert "train/loss" not in logged[2] and all("train/loss" in logged[s] for s in (1, 3, 4, 5, 6))
    root = run_dir / "checkpoints"
    step1, step2, step3 = (root / ckpt.step_dir_name(s) for s in (1, 2, 3))
    for rank in (0, 1):
        before, skipped, after = (optimizer_state(d, rank) for d in (step1, step2, step3))
        masters = "single_partition_of_fp32_groups"
        assert all(torch.equal(a, b) for a, b in zip(before[masters], skipped[masters])), rank
        moments = before["base_optimizer_state"]["state"], skipped["base_optimizer_state"]["state"]
        for index in moments[0]:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(moments[0][index][key], moments[1][index][key]), (rank, index, key)
        assert not all(torch.equal(a, b) for a, b in zip(skipped[masters], after[masters])), rank
    # DeepSpeed's own counters: the skip went through its overflow path, and its steps stayed in phase.
    assert [(model_states(d)["global_steps"], model_states(d)["skipped_steps"]) for d in (step1, step2, step3)] \
        == [(1, 0), (2, 1), (3, 1)]


def test_in_bf16_with_the_fused_checks_a_nan_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """bf16 sends a non-finite step through ZeRO's own checks (fp32 runs skip it in the trainer), here the fused
    ones (trainer/zero_checks.py; tests/trainer/test_zero_checks.py tests each alone): rank 1's NaN gradients must
    stop the update on both ranks, which only rank 1's check can see before the ranks agree."""
    run_dir = tmp_path / "run"
    output = launch(run_dir, "training.precision=bf16", "training.max_steps=3", "checkpoint.save_every=1",
                    "checkpoint.keep_last=3", "training.eval_every=0", "checkpoint.export_hf=false",
                    fault=NAN_ON_RANK1)
    assert "gradient checks: ZeRO's inf/NaN test and gradient norm fused over all tensors" in output  # rank 0 logs
    assert "fused gradient checks:" not in output  # neither refused nor replaced by DeepSpeed's own
    assert "step 2: skipped, non-finite loss on rank(s) 1" in output
    root = run_dir / "checkpoints"
    counters = [model_states(root / ckpt.step_dir_name(s)) for s in (1, 2, 3)]
    assert [(c["global_steps"], c["skipped_steps"]) for c in counters] == [(1, 0), (2, 1), (3, 1)]
    for rank in (0, 1):
        files = [root / ckpt.step_dir_name(s) / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for s in (1, 2)]
        before, skipped = (torch.load(f, weights_only=False, map_location="cpu")["optimizer_state_dict"] for f in files)
        masters = "single_partition_of_fp32_groups"
        assert all(torch.equal(a, b) for a, b in zip(before[masters], skipped[masters])), rank


def test_sigterm_to_the_ranks_saves_a_checkpoint_on_every_rank_and_exits_zero(preempted):
    run_dir, returncode, output = preempted
    assert returncode == 0, output[-4000:]
    assert "preempted (SIGTERM): checkpoint saved at step 2; continue with checkpoint.resume=auto" in output
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000001", "step_00000002"]
    step2 = root / "step_00000002"
    ckpt.verify(step2)
    manifest = json.loads((step2 / ckpt.MANIFEST).read_text())
    for rank in (0, 1):
        assert f"rng_rank{rank}.pt" in manifest["files"]
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest["files"]
    assert sorted(metrics(run_dir)) == [1, 2]
    assert not (run_dir / "hf_model").exists()


def test_resume_after_preemption_continues_the_uninterrupted_run(reference, preempted, resumed):
    reference_dir, _ = reference
    run_dir, output = resumed
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in output
    expected, got = metrics(reference_dir), metrics(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step]["train/data_checksum"] == expected[step]["train/data_checksum"], step  # same batches
        assert got[step]["train/skipped_steps"] == expected[step]["train/skipped_steps"], step
    for step in range(3, 7):
        assert got[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], abs=1e-5), step
    # One W&B run: the id the checkpoint carried, in both offline directories (`wandb sync` merges
    # them; online, wandb.init(id=..., resume="allow") continues the run); the second logs steps 3-6.
    run_id = ckpt.read_state(run_dir / "checkpoints/step_00000002").wandb_run_id
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline), offline
    steps = []
    for directory in offline:
        records = wandb_records(directory / f"run-{run_id}.wandb")
        assert next(r.run for r in records if r.WhichOneof("record_type") == "run").run_id == run_id
        steps.append(sorted({r.history.step.num for r in records if r.WhichOneof("record_type") == "history"}))
    assert steps == [[1, 2], [3, 4, 5, 6]]


def test_resuming_with_another_world_size_is_refused(resumed):
    run_dir, _ = resumed
    env = environment()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(TINY),
                           f"run.output_dir={run_dir}", *COMMON, "training.max_steps=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {run_dir}/checkpoints/step_00000006 cannot be resumed by this run: "
                           "it was written by 2 ranks and this run has 1: resume with the same number of ranks "
                           "(deepspeed --num_gpus 2 ...)"), line
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------
# ZeRO-3 + LoRA: what is saved is what was trained


@pytest.fixture(scope="module")
def zero3_lora(tmp_path_factory):
    from kvforge.models.loading import load_pretrained

    root = tmp_path_factory.mktemp("zero3_lora")
    config = yaml.safe_load(TINY.read_text())
    torch.manual_seed(0)
    base, tokenizer = load_pretrained("smollm2-135m-instruct", init="random",
                                      config_overrides=config["model"]["config"])
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config["model"] = {"name": str(base_dir), "init": "pretrained"}
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir, dumped = root / "run", root / "logits.pt"
    output = launch(run_dir, "deepspeed.zero_stage=3", "training.lora.r=4", "training.max_steps=4",
                    "checkpoint.save_every=2", "training.eval_every=0", "logging.wandb=disabled",
                    config=path, fault="nan_loss:2@0", KVFORGE_DUMP_LOGITS=str(dumped))
    return run_dir, base_dir, torch.load(dumped), output


def test_zero3_lora_checkpoint_lists_the_adapters_and_skips_a_nan_step(zero3_lora):
    run_dir, _, _, output = zero3_lora
    assert "step 2: skipped, non-finite loss on rank(s) 0" in output
    step2, step4 = run_dir / "checkpoints/step_00000002", run_dir / "checkpoints/step_00000004"
    manifest = json.loads((step4 / ckpt.MANIFEST).read_text())
    assert manifest["zero_stage"] == 3
    trainable = manifest["trainable"]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == [4, 64]
    # ZeRO-3's module state holds empty placeholders (allowed); everything else has data.
    for rel, entry in manifest["files"].items():
        for key, meta in entry.get("tensors", {}).items():
            assert 0 not in meta["shape"] or ("model_states" in rel and key.startswith("module.")), (rel, key)
    states = torch.load(step2 / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert (states["global_steps"], states["skipped_steps"]) == (2, 1)


def test_zero3_lora_adapter_and_merged_export_reproduce_the_trained_logits(zero3_lora):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, base_dir, dumped, _ = zero3_lora
    input_ids, trained = dumped["input_ids"], dumped["logits"]
    adapter = load_file(run_dir / "lora_adapter/adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(t.numel() > 0 for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in adapter.items())  # trained, not init

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").eval()
        torch.testing.assert_close(merged(input_ids).logits, trained, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        base_logits = base(input_ids).logits
        with_adapter = PeftModel.from_pretrained(base, run_dir / "lora_adapter").eval()
        torch.testing.assert_close(with_adapter(input_ids).logits, trained, rtol=0, atol=1e-4)
    assert (base_logits - trained).abs().max() > 1e-2  # the adapter changed the model: the check has teeth
