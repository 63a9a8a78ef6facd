"""Faults injected into single-process runs of the trainer entry point (launch/train.py, world size 1).

Each test breaks something on purpose -- kills a save halfway, corrupts or truncates a checkpoint
file, makes losses NaN, feeds bad data, a mismatched tokenizer, a misspelt DeepSpeed key, a config
that does not fit the checkpoint -- and checks what the user gets: nothing lost, the run continuing
exactly where it should, or one clear line naming the bad file/key and exit code 2.

Most runs call the launcher's `main()` in this process (a gloo world of one, torn down after the
module): a training start costs seconds instead of the ~30 s of a fresh Python with torch and
DeepSpeed. Two run as real subprocesses, where the process itself is the point: the SIGKILL in
the middle of a save, and the exit code / stderr of a bad explicit resume. The 2-rank faults
(preemption, a NaN on one rank, ZeRO-3 + LoRA) are in test_reliability_distributed.py.
"""

import ast
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from ports import free_port

from kvforge.trainer import checkpoint as ckpt
from kvforge.trainer.runtime import Faults
from kvforge.trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny-llama.yaml"
COMPRESSED = REPO / "configs/tiny-compressed.yaml"
# Small and fast: no eval during training, no export unless a test needs it, no W&B.
QUICK = ["training.eval_every=0", "checkpoint.export_hf=false", "logging.wandb=disabled"]


class Outcome:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return f"rc={self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def run_in_process(main, run_dir, *overrides, config=TINY, fault=None) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    os.environ.pop("KVFORGE_FAULT", None)
    if fault:
        os.environ["KVFORGE_FAULT"] = fault
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["--config", str(config), f"run.output_dir={run_dir}", *QUICK, *overrides])
    finally:
        os.environ.pop("KVFORGE_FAULT", None)
    return Outcome(rc, out.getvalue(), err.getvalue())


def run_subprocess(run_dir, *overrides, config=TINY, fault=None) -> Outcome:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KVFORGE_FAULT"):
        env.pop(key, None)
    if fault:
        env["KVFORGE_FAULT"] = fault
    cmd = [sys.executable, str(REPO / "launch/train.py"), "--config", str(config), f"run.output_dir={run_dir}",
           *QUICK, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the last training record logged for it."""
    return read_metrics(run_dir, "train/lr")


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def assert_one_line_error(outcome: Outcome, *fragments: str) -> None:
    assert outcome.rc == 2, outcome
    line = last_line(outcome.err)
    assert line.startswith("error: "), outcome
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in outcome.err, outcome


# ---------------------------------------------------------------------------------------------------
# A crash in the middle of a save, a truncated and a corrupted checkpoint


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """A run killed (SIGKILL) inside the save of step 6, after its files were written, before the manifest.

    Its metrics hold the losses of steps 1-6 -- the uninterrupted trajectory -- since step 6 was logged
    before the save began.
    """
    run_dir = tmp_path_factory.mktemp("crash") / "run"
    outcome = run_subprocess(run_dir, "training.max_steps=6", "checkpoint.save_every=2", "checkpoint.keep_last=2",
                             fault="crash_in_save:6")
    assert outcome.rc == -signal.SIGKILL, outcome
    reference = metrics(run_dir)
    return run_dir, reference


def test_crash_in_save_leaves_only_complete_checkpoints(crashed_run):
    run_dir, reference = crashed_run
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    partial = root / ".tmp-step_00000006"
    assert partial.is_dir() and not (partial / ckpt.MANIFEST).exists()
    assert (partial / "mp_rank_00_model_states.pt").is_file()  # the crash came after the shards
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]


def test_manifest_records_hashes_shapes_and_every_trainable_parameter(crashed_run):
    run_dir, _ = crashed_run
    step = run_dir / "checkpoints/step_00000004"
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["step"] == 4 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {p.name for p in step.iterdir()} - {ckpt.MANIFEST}
    for rel, entry in manifest["files"].items():
        assert entry["bytes"] == (step / rel).stat().st_size and len(entry["sha256"]) == 64
    states = manifest["files"]["mp_rank_00_model_states.pt"]["tensors"]
    assert states["module.model.embed_tokens.weight"] == {"shape": [49152, 64], "dtype": "float32"}
    optim = manifest["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["tensors"]
    masters = [meta["shape"][0] for key, meta in optim.items() if "single_partition_of_fp32_groups" in key]
    assert sum(masters) >= 3_219_776  # ZeRO-2's fp32 master copy of all 3.2M parameters
    tensors = [meta for entry in manifest["files"].values() for meta in entry.get("tensors", {}).values()]
    assert all(0 not in meta["shape"] for meta in tensors)
    # The 2-layer tiny Llama: embeddings (tied with lm_head), 2 x (4 attention + 3 MLP + 2 norms), final norm.
    trainable = manifest["trainable"]
    assert len(trainable) == 1 + 2 * 9 + 1 and trainable["model.layers.1.mlp.down_proj.weight"] == [64, 128]
    assert ckpt.check_contents({r: {**e, "path": step / r} for r, e in manifest["files"].items()}, trainable, 2) == []


@pytest.fixture(scope="module")
def resumed_after_crash(launcher, crashed_run):
    """The crashed run with its newest checkpoint (step 4) truncated, resumed with resume=auto."""
    run_dir, reference = crashed_run
    shard = run_dir / "checkpoints/step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    outcome = run_in_process(launcher, run_dir, "training.max_steps=6", "checkpoint.save_every=2",
                             "checkpoint.keep_last=2")
    assert outcome.rc == 0, outcome
    return run_dir, reference, outcome


def test_resume_skips_the_partial_and_the_truncated_checkpoint_and_says_so(resumed_after_crash):
    run_dir, _, outcome = resumed_after_crash
    assert "removed what an interrupted save left behind: .tmp-step_00000006" in outcome.out, outcome
    assert ("skipping checkpoint step_00000004: checkpoint " in outcome.out
            and "file zero_pp_rank_0_mp_rank_00_optim_states.pt has" in outcome.out
            and "(truncated?)" in outcome.out), outcome
    assert "resuming from step_00000002, the newest checkpoint that verifies (step_00000004 did not)" in outcome.out
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in outcome.out
    root = run_dir / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004", "step_00000006"]
    for step in ckpt.complete_checkpoints(root):
        ckpt.verify(step)  # the truncated step 4 was written again, whole


def test_resume_after_crash_reproduces_the_uninterrupted_steps(resumed_after_crash):
    run_dir, reference, _ = resumed_after_crash
    resumed = metrics(run_dir)
    for step in range(3, 7):
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], abs=1e-5), step
        assert resumed[step]["train/data_checksum"] == reference[step]["train/data_checksum"], step


def test_explicit_resume_of_a_corrupted_checkpoint_fails_naming_the_file(resumed_after_crash, tmp_path):
    run_dir, _, _ = resumed_after_crash
    step6 = run_dir / "checkpoints/step_00000006"
    states = step6 / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the hash can tell
    states.write_bytes(bytes(data))
    # A real process: the exit code and stderr are what a user or a scheduler sees.
    outcome = run_subprocess(tmp_path / "elsewhere", "training.max_steps=8", f"checkpoint.resume={step6}")
    assert_one_line_error(outcome, f"checkpoint {step6}: file mp_rank_00_model_states.pt does not match its "
                                   "sha256 in the manifest (corrupted)")


def test_resume_with_a_different_compression_spec_names_what_changed(launcher, resumed_after_crash, tmp_path):
    run_dir, _, _ = resumed_after_crash
    config = yaml.safe_load(TINY.read_text())
    config["compression"] = {"layers": [{"kv_proj": "low_rank", "k_rank": 12, "v_rank": 12,
                                         "rope": "pre_rope_latent"}, {}]}
    path = tmp_path / "compressed.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_in_process(launcher, run_dir, "training.max_steps=8", config=path)
    assert_one_line_error(outcome, 'cannot be resumed by this run: compression.layers was unset and is now '
                                   '[{"k_rank": 12, "kv_proj": "low_rank",', f"({run_dir}/config.yaml)")
    # The failed attempt changed nothing: the run's own config is still the one to resume with.
    assert "compression: {}" in (run_dir / "config.yaml").read_text()


def test_a_checkpoint_whose_optimizer_groups_differ_is_refused_in_one_line(launcher, tmp_path, monkeypatch):
    """ZeRO lays a checkpoint's optimizer state out by the optimizer's parameter groups. A checkpoint from a kvforge
    that grouped them otherwise (before every parameter whose length is not a multiple of 8 values got a group of
    its own) is refused in one line that says what to do, not with DeepSpeed's error about its alignment setting:
    before DeepSpeed is asked where the checkpoint records its groups, after it fails where it does not."""
    from kvforge.trainer import stages, train

    steps = ["checkpoint.save_every=2", "training.eval_every=0"]
    with monkeypatch.context() as old:  # the grouping of before: by weight decay only
        old.setattr(stages, "ALIGN_ELEMENTS", 1)
        recorded = run_in_process(launcher, tmp_path / "recorded", "training.max_steps=2", *steps, config=COMPRESSED)
        old.setattr(train, "optimizer_layout", lambda module: [])  # and no groups in the checkpoint, as then
        unrecorded = run_in_process(launcher, tmp_path / "unrecorded", "training.max_steps=2", *steps,
                                    config=COMPRESSED)
    assert recorded.rc == 0 and unrecorded.rc == 0, (recorded, unrecorded)
    outcome = run_in_process(launcher, tmp_path / "recorded", "training.max_steps=4", *steps, config=COMPRESSED)
    assert_one_line_error(outcome, "cannot be resumed by this run: its optimizer state is laid out in other "
                                   "parameter groups (group 1 holds", "launch/export.py")
    outcome = run_in_process(launcher, tmp_path / "unrecorded", "training.max_steps=4", *steps, config=COMPRESSED)
    assert_one_line_error(outcome, "DeepSpeed could not load checkpoint", "launch/export.py", "checkpoint.resume=never")
    # This kvforge's own checkpoints record their groups and resume.
    run_in_process(launcher, tmp_path / "now", "training.max_steps=2", *steps, config=COMPRESSED)
    outcome = run_in_process(launcher, tmp_path / "now", "training.max_steps=4", *steps, config=COMPRESSED)
    assert outcome.rc == 0 and "resumed from" in outcome.out + outcome.err, outcome


# ---------------------------------------------------------------------------------------------------
# Non-finite losses


def test_the_loss_from_hidden_states_trains_as_the_loss_from_logits(launcher, tmp_path):
    """training.loss_from=hidden (chunked projection, logits never held) and =logits give the same losses step
    after step, cross-entropy and distillation alike (fp32, tied embeddings), and under ZeRO-3 too."""
    steps = ["training.max_steps=3", "training.grad_accum=1", "checkpoint.save_every=0"]
    for weight in ("0.0", "0.5"):
        runs = {}
        for source in ("hidden", "logits"):
            run_dir = tmp_path / f"w{weight}-{source}"
            outcome = run_in_process(launcher, run_dir, *steps, f"training.distill_weight={weight}",
                                     "training.distill_temperature=2.0", f"training.loss_from={source}")
            assert outcome.rc == 0, outcome
            expected = "from hidden states" if source == "hidden" else "from full logits"
            assert f"loss: {expected}" in outcome.out + outcome.err, outcome
            runs[source] = metrics(run_dir)
        assert sorted(runs["hidden"]) == [1, 2, 3]
        for step, record in runs["hidden"].items():
            assert record["train/loss"] == pytest.approx(runs["logits"][step]["train/loss"], rel=1e-5), step
    # Under ZeRO-3 the output projection's weight is partitioned outside its own forward: the loss module
    # (an external parameter's user) must see it whole, in the forward and the backward, or the losses drift.
    zero3 = {}
    for source in ("hidden", "logits"):
        run_dir = tmp_path / f"zero3-{source}"
        outcome = run_in_process(launcher, run_dir, *steps, "training.distill_weight=0.5",
                                 "training.distill_temperature=2.0", f"training.loss_from={source}",
                                 "deepspeed.zero_stage=3")
        assert outcome.rc == 0, outcome
        zero3[source] = metrics(run_dir)
    assert sorted(zero3["hidden"]) == [1, 2, 3]
    for step, record in zero3["hidden"].items():
        assert record["train/loss"] == pytest.approx(zero3["logits"][step]["train/loss"], rel=1e-5), step


def test_a_compiled_student_and_teacher_train_as_the_eager_ones(launcher, tmp_path):
    """training.compile=true (torch.compile of the student's engine and of the teacher, in place), whole or one
    decoder layer at a time (training.compile_scope), gives the eager losses step after step on a compressed model
    with distillation, and checkpoints the same parameter names."""
    steps = ["training.max_steps=3", "training.grad_accum=1", "checkpoint.save_every=3", "training.eval_every=0"]
    from torch._dynamo.utils import counters

    variants = {"eager": ["training.compile=false"], "model": ["training.compile=true"],
                "layers": ["training.compile=true", "training.compile_scope=layers"]}
    runs = {}
    for variant, overrides in variants.items():
        run_dir = tmp_path / f"compile-{variant}"
        counters.clear()
        outcome = run_in_process(launcher, run_dir, *steps, *overrides, config=COMPRESSED)
        assert outcome.rc == 0, outcome
        runs[variant] = metrics(run_dir)
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (variant != "eager"), (variant, graphs)  # compiled means dynamo made graphs
        # The first step's log line says what compiling cost and how many graphs it made.
        said = re.search(r"step 1: [0-9.]+ s, compiling included; compile: (\d+) graph", outcome.out + outcome.err)
        assert (said is not None) == (variant != "eager"), (variant, outcome.err[-2000:])
        assert said is None or int(said.group(1)) == graphs, (said.group(0), graphs)
    for variant in ("model", "layers"):
        assert sorted(runs[variant]) == [1, 2, 3], variant
        for step, record in runs[variant].items():
            assert record["train/loss"] == pytest.approx(runs["eager"][step]["train/loss"], rel=1e-4), (variant, step)
    names = [json.loads((tmp_path / f"compile-{v}/checkpoints/step_00000003/MANIFEST.json").read_text())["trainable"]
             for v in variants]
    assert names[0] == names[1] == names[2]


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(launcher, tmp_path):
    """Without ZeRO (fp32) DeepSpeed calls the plain torch optimizer, which has no overflow check of its
    own: the trainer's guard must keep weights and AdamW moments untouched for the bad steps."""
    run_dir = tmp_path / "run"
    outcome = run_in_process(launcher, run_dir, "deepspeed.zero_stage=0", "training.max_steps=8",
                             "checkpoint.save_every=2", "checkpoint.keep_last=5", "training.max_bad_steps=2",
                             fault="nan_loss:3-")
    assert outcome.rc == 3, outcome
    line = last_line(outcome.err)
    assert line.startswith("training stopped: 2 steps in a row (3-4) had a non-finite loss or gradients "
                           "(training.max_bad_steps=2)"), line
    assert f"Checkpoint {run_dir}/checkpoints/step_00000004 holds the model as of step 2" in line
    assert "step 3: skipped, non-finite loss on rank(s) 0; weights and optimizer state unchanged" in outcome.out
    logged = metrics(run_dir)
    assert [logged[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert "train/loss" in logged[2] and "train/loss" not in logged[3]
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    state = ckpt.read_state(root / "step_00000004")
    assert (state.step, state.skipped_steps, state.bad_steps_in_a_row) == (4, 2, 2)
    good, stopped = (torch.load(root / f"step_0000000{s}/mp_rank_00_model_states.pt", weights_only=False)
                     for s in (2, 4))
    assert stopped["global_steps"] == 4  # the engine's counters moved on; its weights and moments did not
    for name, weight in good["module"].items():
        assert torch.equal(weight, stopped["module"][name]), name
    moments_good, moments_stopped = good["optimizer"]["state"], stopped["optimizer"]["state"]
    assert moments_good.keys() == moments_stopped.keys() and len(moments_good) == 20
    for index, state_good in moments_good.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_good[key], moments_stopped[index][key]), (index, key)


# ---------------------------------------------------------------------------------------------------
# Bad data, a mismatched tokenizer, a misspelt DeepSpeed key, changed data under a checkpoint


PROSE = ("The quick brown fox jumps over the lazy dog while the interpreter evaluates every expression "
         "from left to right, binding names in the innermost scope before looking outwards. ")


def write_corpus(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def test_empty_blank_invalid_utf8_and_overlong_documents_are_counted_and_trained_on(launcher, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {
        **{f"doc{i}.txt": f"Document {i}. " + PROSE * 3 for i in range(8)},
        "empty.txt": "",
        "blank.md": "  \n\t\n   ",
        "latin1.txt": ("caf\xe9 na\xefve " + PROSE).encode("latin-1"),  # not UTF-8: decoded with U+FFFD
        "long.txt": PROSE * 60,  # ~40 rows of 64 tokens: split across rows, not dropped
        "rows.jsonl": "\n".join(json.dumps({"text": PROSE * 2, "id": i}) for i in range(3)) + "\n\n",
    })
    outcome = run_in_process(launcher, tmp_path / "run", f"data.source={corpus}", "data.max_documents=null",
                             f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=2")
    assert outcome.rc == 0, outcome
    line = next(l for l in outcome.out.splitlines() if "] data: {" in l)  # after the log's "[ seconds]"
    # Every log line carries the seconds since the run started, never going back (a slow phase shows in the log).
    seconds = [float(l[1:l.index("s]")]) for l in outcome.out.splitlines() if l.startswith("[") and "s] " in l]
    assert len(seconds) > 3 and seconds == sorted(seconds), seconds
    stats = ast.literal_eval(line[line.index("data: {") + len("data: "):])
    assert stats["skipped_empty_documents"] == 2 and stats["invalid_utf8_files"] == 1, stats
    assert stats["train_documents"] + stats["eval_documents"] == 8 + 1 + 1 + 3, stats
    assert stats["train_rows"] + stats["eval_rows"] > 40, stats


@pytest.mark.parametrize("files, overrides, fragments", [
    ({"a.jsonl": '{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text field"}\n'}, [],
     ["a.jsonl line 3: row has no field 'text' (fields: ['body'])"]),
    ({"a.jsonl": '{"text": "fine"}\n{"text": "fine", \n'}, [], ["a.jsonl line 2: invalid JSON"]),
    ({"a.jsonl": '{"text": "fine"}\n{"text": null}\n'}, [], ["a.jsonl line 2: field 'text' is null"]),
    ({"empty.txt": "", "blank.txt": " \n\t"}, [], ["has no non-empty documents", "'skipped_empty_documents': 2"]),
    ({f"d{i}.txt": PROSE for i in range(4)}, ["data.seq_len=512"],
     ["split of", "one row of seq_len=512 needs 512"]),
    ({f"d{i}.txt": PROSE * 3 for i in range(6)}, ["training.micro_batch_size=64"],
     ["the training set has", "needs 64 rows"]),
], ids=["row-without-text-field", "malformed-json-line", "null-text", "only-empty-documents",
        "shorter-than-one-row", "smaller-than-one-batch"])
def test_bad_data_fails_before_training_naming_the_problem(launcher, tmp_path, files, overrides, fragments):
    corpus = write_corpus(tmp_path / "corpus", files)
    outcome = run_in_process(launcher, tmp_path / "run", f"data.source={corpus}", "data.max_documents=null",
                             f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=2", *overrides)
    assert_one_line_error(outcome, *fragments)
    assert not (tmp_path / "run/checkpoints").exists()


def test_tokenizer_larger_than_the_model_vocabulary_is_a_clear_error(launcher, tmp_path):
    outcome = run_in_process(launcher, tmp_path / "run", "model.config.vocab_size=1000")
    assert_one_line_error(outcome, "has 49152 tokens but model 'smollm2-135m-instruct' embeds only vocab_size=1000")


def test_a_calibration_larger_than_the_data_is_a_one_line_error(launcher, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {f"d{i}.txt": f"Document {i}. " + PROSE * 2 for i in range(6)})
    outcome = run_in_process(launcher, tmp_path / "run", f"data.source={corpus}", "data.max_documents=null",
                             f"data.cache_dir={tmp_path / 'cache'}", "compression.calibration.tokens=10000000",
                             config=REPO / "configs/tiny-compressed.yaml")
    assert_one_line_error(outcome, "calibration asks for 10000000 tokens", "lower the calibration tokens")


def test_misspelt_deepspeed_key_is_refused_instead_of_ignored(launcher, tmp_path):
    outcome = run_in_process(launcher, tmp_path / "run", "deepspeed.config={zero_optimisation: {stage: 3}}")
    assert_one_line_error(outcome, "unknown config key 'deepspeed.config.zero_optimisation': DeepSpeed would "
                                   "ignore it; did you mean 'deepspeed.config.zero_optimization'?")


def test_resume_on_changed_data_is_refused(launcher, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {f"d{i}.txt": f"Document {i}. " + PROSE * 4 for i in range(10)})
    common = [f"data.source={corpus}", "data.max_documents=null", f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_in_process(launcher, tmp_path / "run", *common, "training.max_steps=2")
    assert first.rc == 0, first
    (corpus / "d3.txt").write_text("Edited. " + PROSE * 4)  # the same settings, other tokens
    again = run_in_process(launcher, tmp_path / "run", *common, "training.max_steps=3")
    assert_one_line_error(again, "step_00000002 was trained on other data: the packed training rows differ")


# ---------------------------------------------------------------------------------------------------
# The pieces, without a run


def test_fault_spec_is_parsed_strictly():
    faults = Faults("nan_loss:2@1, stall:3, crash_in_save:5-7, sigterm:4-")
    assert faults.fires("nan_loss", 2, 1) and not faults.fires("nan_loss", 2, 0)
    assert faults.fires("stall", 3, 0) and faults.fires("stall", 3, 1) and not faults.fires("stall", 4, 0)
    assert [faults.fires("crash_in_save", s, 0) for s in (4, 5, 7, 8)] == [False, True, True, False]
    assert faults.fires("sigterm", 400, 0) and not faults.fires("sigterm", 3, 0)
    for bad in ("nan_los:2", "nan_loss", "nan_loss:x", "nan_loss:0", "stall:2@1", "sigterm:2@one"):
        with pytest.raises(ValueError, match="KVFORGE_FAULT entry"):
            Faults(bad)


def fake_checkpoint(root: Path, step: int) -> Path:
    """A folder with two files and a manifest, as `save` leaves it (no engine needed for verification)."""
    folder = root / ckpt.step_dir_name(step)
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((4, 4), float(step))}}, folder / "mp_rank_00_model_states.pt")
    (folder / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step}))
    files = {p.name: ckpt.describe_file(p) for p in sorted(folder.iterdir())}
    (folder / ckpt.MANIFEST).write_text(json.dumps({"format": 2, "step": step, "files": files}))
    return folder


def test_verify_names_the_missing_truncated_or_corrupted_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    ckpt.verify(folder)
    states = folder / "mp_rank_00_model_states.pt"
    original = states.read_bytes()
    states.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="file mp_rank_00_model_states.pt does not match its sha256"):
        ckpt.verify(folder)
    states.write_bytes(original[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"has 100 bytes, the manifest says \d+ \(truncated\?\)"):
        ckpt.verify(folder)
    states.unlink()
    with pytest.raises(ckpt.CheckpointError, match="file mp_rank_00_model_states.pt is missing"):
        ckpt.verify(folder)
    (folder / ckpt.MANIFEST).write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="unreadable MANIFEST.json"):
        ckpt.verify(folder)


def test_find_resumable_falls_back_and_refuses_when_nothing_verifies(tmp_path):
    first, second = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    (tmp_path / ".tmp-step_00000003").mkdir()
    (tmp_path / ".old-step_00000000").mkdir()
    (tmp_path / "step_00000009").mkdir()  # no manifest: never complete
    assert ckpt.find_resumable(tmp_path, log=lambda _: None) == second
    (second / ckpt.TRAINER_STATE).write_text("{}")  # same name, other content
    said = []
    assert ckpt.find_resumable(tmp_path, log=said.append) == first
    assert said[0].startswith("skipping checkpoint step_00000002: ") and "trainer_state.json" in said[0]
    assert said[1] == "resuming from step_00000001, the newest checkpoint that verifies (step_00000002 did not)"
    (first / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoints in .* verifies"):
        ckpt.find_resumable(tmp_path, log=lambda _: None)
    assert sorted(ckpt.remove_incomplete(tmp_path)) == [".old-step_00000000", ".tmp-step_00000003", "step_00000009"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_check_contents_refuses_empty_tensors_and_missing_parameters(tmp_path):
    def describe(payload: dict, name: str) -> dict:
        torch.save(payload, tmp_path / name)
        return {name: {**ckpt.describe_file(tmp_path / name), "path": tmp_path / name}}

    trainable = {"layer.lora_A.weight": [4, 64], "layer.lora_B.weight": [64, 4]}
    # ZeRO-3: empty module placeholders are expected; the shapes live in param_shapes.
    zero3 = describe({"module": {"layer.lora_A.weight": torch.empty(0), "layer.lora_B.weight": torch.empty(0)},
                      "param_shapes": [{"layer.lora_A.weight": torch.Size([4, 64]),
                                        "layer.lora_B.weight": torch.Size([64, 4])}]},
                     "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert ckpt.check_contents(zero3, trainable, zero_stage=3) == []
    # The same placeholders without ZeRO-3, i.e. an adapter "saved" empty, and a parameter not saved at all.
    plain = describe({"module": {"layer.lora_A.weight": torch.empty(0)}}, "mp_rank_00_model_states.pt")
    problems = ckpt.check_contents(plain, trainable, zero_stage=0)
    assert "mp_rank_00_model_states.pt: tensor module.layer.lora_A.weight is empty (shape [0])" in problems
    assert "trainable parameter layer.lora_A.weight (shape [4, 64]) is not in the checkpoint" in problems
    assert "trainable parameter layer.lora_B.weight (shape [64, 4]) is not in the checkpoint" in problems
    wrong = describe({"module": {"layer.lora_A.weight": torch.zeros(4, 32)}}, "mp_rank_00_model_states.pt")
    assert "trainable parameter layer.lora_A.weight is saved with shape [4, 32], expected [4, 64]" in \
        ckpt.check_contents(wrong, trainable, zero_stage=0)


def _two_ranks(rank: int, port: int, folder: str, results) -> None:
    """Collective behaviour with 2 gloo ranks and no launcher: agreement on a signal one rank got,
    an error on rank 0 raised on both, a corrupt file found by the rank checking it, a save that rank 0
    refuses to commit failing on both."""
    import kvforge.trainer.runtime as train_mod
    from kvforge.trainer.data import DataError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    preemption = train_mod.Preemption()
    try:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        out["agreed"] = preemption.agreed(torch.device("cpu"))
        out["signal"] = preemption.signal_name
    finally:
        preemption.restore()

    def fail():
        raise DataError("rows.jsonl line 3: row has no field 'text'")

    try:
        train_mod.on_rank0_first(rank, fail, others=lambda: "never")
    except DataError as e:
        out["rank0_failure"] = str(e)
    try:
        ckpt.verify_collective(Path(folder))
    except ckpt.CheckpointError as e:
        out["verify"] = str(e)

    class EmptyEngine:
        """Writes a model state whose only weight is empty: rank 0 must refuse to commit it."""
        module = torch.nn.Linear(2, 2)

        def save_checkpoint(self, root, tag, save_latest):
            if dist.get_rank() == 0:
                torch.save({"module": {"weight": torch.empty(0), "bias": torch.zeros(2)}},
                           Path(root) / tag / "mp_rank_00_model_states.pt")

        def zero_optimization_stage(self):
            return 0

    state = ckpt.TrainerState(step=1, tokens_seen=0, world_size=2, wandb_run_id=None, config_fingerprint="")
    try:
        ckpt.save(EmptyEngine(), Path(folder).parent / "saves", state, keep_last=1)
    except ckpt.CheckpointError as e:
        out["save"] = str(e)
    dist.destroy_process_group()
    results[rank] = out


def test_signal_to_one_rank_and_an_error_on_rank_zero_reach_every_rank(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    files = sorted(json.loads((folder / ckpt.MANIFEST).read_text())["files"])
    (folder / files[1]).write_bytes(b"garbage")  # checked by rank 1 (round robin over sorted files)
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, str(folder), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        assert results[rank]["agreed"] is True
        assert results[rank]["rank0_failure"] == "rows.jsonl line 3: row has no field 'text'"
        assert f"file {files[1]} has 7 bytes" in results[rank]["verify"]
        assert "refusing to mark it complete: mp_rank_00_model_states.pt: tensor module.weight is empty" in \
            results[rank]["save"]
    assert not list((tmp_path / "saves").glob("step_*"))
    assert (results[0]["signal"], results[1]["signal"]) == (None, "SIGTERM")
