"""The real launcher end to end: `deepspeed --num_gpus 2 launch/train.py` with two gloo ranks on CPU.

A tiny random Llama (with the real SmolLM2 tokenizer) on the standard library's docstrings. These are
the slowest tests of the suite (each launch costs ~30-60 s of process start-up on 2 cores), so one
ZeRO-2 run serves the loss, checkpoint, W&B and resume checks, and one ZeRO-3 run checks stage 3.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"

pytestmark = pytest.mark.distributed


def launch(run_dir: Path, *overrides: str, config: str = "configs/tiny-llama.yaml",
           ranks: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), str(REPO / "launch/train.py"),
           "--config", str(REPO / config), f"run.output_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    # DeepSpeed's CPU all-reduce buffers (66 MB of /dev/shm each) are gone with the ranks (trainer/runtime.py).
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left DeepSpeed's shared-memory buffers: {left}"
    return proc


def wandb_records(path: Path) -> list:
    """Records of an offline W&B run file (wandb >= 0.2x writes no readable summary offline).

    The file is a 7-byte header (":W&B", magic, version) and then LevelDB-log records in 32 KiB blocks:
    crc32 (4 bytes), length (2, little endian), type (1: full, 2: first, 3: middle, 4: last).
    """
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert raw[:4] == b":W&B", raw[:8]
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]  # a resumed run overwrites the steps it redoes
    return losses


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    proc = launch(run_dir, "deepspeed.zero_stage=2")
    return run_dir, proc


def test_zero2_loss_goes_down_and_checkpoints_appear(zero2_run):
    run_dir, proc = zero2_run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.5, losses
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000008"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    for name in ckpts:
        assert (run_dir / "checkpoints" / name / "MANIFEST.json").is_file()
        assert (run_dir / "checkpoints" / name / "rng_rank1.pt").is_file()
    assert (run_dir / "config.yaml").is_file()
    summary = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith('{"run_dir"')))
    assert summary["step"] == 8 and summary["hf_model"] == str(run_dir / "hf_model")


def test_zero2_exports_a_loadable_hf_model(zero2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = zero2_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf_model")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    # The exported weights are the trained ones: they match the final checkpoint's fp32 masters.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000008")
    exported = model.state_dict()
    for name, value in masters.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    ids = tok("def main():", return_tensors="pt").input_ids
    assert model(ids).logits.isfinite().all()


def test_zero2_wandb_offline_run_holds_metrics_and_config(zero2_run):
    run_dir, _ = zero2_run
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    records = wandb_records(offline[0] / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id
    config_keys = {u.key for u in run.config.update}
    assert {"training", "model", "data", "deepspeed", "deepspeed_resolved"} <= config_keys
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = set().union(*history)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_gib",
                "eval/loss", "eval/perplexity"):
        assert key in logged, key
    losses = train_losses(run_dir)
    by_step = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert by_step == pytest.approx(losses)


def test_zero2_resume_reproduces_the_uninterrupted_losses(zero2_run, tmp_path):
    run_dir, _ = zero2_run
    reference = train_losses(run_dir)
    # The state of an interrupted run: everything up to the step-4 checkpoint.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("hf_model", "step_00000008"))
    metrics = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text(
        "\n".join(l for l in metrics if json.loads(l)["step"] <= 4) + "\n")
    proc = launch(resumed_dir, "deepspeed.zero_stage=2", "checkpoint.resume=auto")
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    resumed = train_losses(resumed_dir)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), (step, resumed[step], reference[step])
    # The same W&B run continues: one id, its offline directories all carry it.
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert (resumed_dir / "wandb_run_id.txt").read_text().strip() == run_id
    dirs = list((resumed_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(run_id) for d in dirs)


def test_zero3_trains_checkpoints_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, "deepspeed.zero_stage=3", "training.max_steps=4", "checkpoint.save_every=2",
           "training.eval_every=0", "logging.wandb=disabled")
    losses = train_losses(run_dir)
    assert losses[4] < losses[1], losses
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert all(p.numel() > 0 for p in model.parameters())  # no empty ZeRO-3 placeholders
    assert sum(p.numel() for p in model.parameters()) > 3_000_000


def test_compressed_model_recovers_with_distillation_on_two_ranks(tmp_path):
    """compression section -> surgery once on rank 0 -> both ranks train the compressed model (ZeRO-2)."""
    run_dir = tmp_path / "run"
    launch(run_dir, "logging.wandb=disabled", config="configs/tiny-compressed.yaml")
    losses = train_losses(run_dir)
    assert losses[6] < losses[1], losses
    from transformers import AutoConfig

    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    init = AutoConfig.from_pretrained(run_dir / "compressed_init")
    assert init.model_type == "kvforge"
    trained = KVForgeForCausalLM.from_pretrained(run_dir / "hf_model")
    layers = trained.config.compression["layers"]
    assert layers[0]["kv_proj"] == "low_rank" and layers[2]["kv_from"] == 1 and layers[3]["probs_from"] == 0
    start = KVForgeForCausalLM.from_pretrained(run_dir / "compressed_init")
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert "model.layers.0.self_attn.k_down.weight" in moved  # the compressed projections were trained
