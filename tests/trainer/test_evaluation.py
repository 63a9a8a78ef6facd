"""trainer/evaluation.py and launch/evaluate.py: perplexity against a hand computation, against
transformers' own loss, chunked == unchunked, across ranks, and (real_model) the launcher on SmolLM2."""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch_scripts import load_launch_script

from kvforge.trainer import evaluation
from kvforge.trainer.evaluation import evaluate_perplexity

REPO = Path(__file__).resolve().parents[2]


class TableLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a model whose every prediction is known in advance."""

    def __init__(self, table_VV: torch.Tensor, logits_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = torch.nn.Parameter(table_VV)
        self.logits_dtype = logits_dtype
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.table[input_ids].to(self.logits_dtype))


def tiny_llama(vocab_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(config).eval()


def test_matches_a_hand_computation():
    # Vocabulary of 3; row [0, 1, 2] predicts 1 from 0 and 2 from 1; row [2, 2, 0] predicts 2 from 2, 0 from 2.
    table = torch.tensor([[0.0, 1.0, 2.0],
                          [1.0, 1.0, 1.0],
                          [3.0, 0.0, 0.5]])
    rows = torch.tensor([[0, 1, 2], [2, 2, 0]], dtype=torch.int32)

    def nll(logits, target):
        return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))

    t = table.tolist()
    expected_nlls = [nll(t[0], 1), nll(t[1], 2), nll(t[2], 2), nll(t[2], 0)]
    expected = sum(expected_nlls) / 4
    for batch_size in (1, 2, 5):
        result = evaluate_perplexity(TableLM(table), rows, batch_size, "cpu")
        assert result["tokens"] == 4
        assert result["loss"] == pytest.approx(expected, rel=1e-6)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    # The hand numbers themselves: uniform logits give log(3), the rest by their softmax.
    assert expected_nlls[1] == pytest.approx(math.log(3))
    assert expected_nlls[0] == pytest.approx(-math.log(math.e / (1 + math.e + math.e**2)))


def test_equals_transformers_loss_token_weighted_over_uneven_batches():
    model = tiny_llama()
    rows = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(1))
    result = evaluate_perplexity(model, rows, 2, "cpu")  # batches of 2, 2, 1 rows
    with torch.no_grad():
        losses = [model(input_ids=rows[i:i + 2], labels=rows[i:i + 2]).loss.item() for i in (0, 2, 4)]
    expected = (losses[0] * 2 + losses[1] * 2 + losses[2]) / 5  # every row has 11 predictions
    assert result["tokens"] == 5 * 11
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_chunked_loss_equals_one_piece(monkeypatch):
    torch.manual_seed(0)
    logits_BLV = torch.randn(3, 17, 50, dtype=torch.bfloat16)
    input_ids_BL = torch.randint(0, 50, (3, 17))
    whole = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].float().reshape(-1, 50),
                                              input_ids_BL[:, 1:].reshape(-1), reduction="sum").double()
    for chunk_elements in (1, 50 * 3 * 4, 1 << 24):  # one position, four positions, all at once
        monkeypatch.setattr(evaluation, "LOSS_CHUNK_ELEMENTS", chunk_elements)
        got = evaluation.next_token_nll_sum(logits_BLV, input_ids_BL)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(whole.item(), rel=1e-6)


def test_low_precision_logits_are_scored_in_float32():
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 4
    rows = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(1))
    bf16 = evaluate_perplexity(TableLM(table, torch.bfloat16), rows, 2, "cpu")
    upcast = evaluate_perplexity(TableLM(table.bfloat16().float()), rows, 2, "cpu")
    assert bf16["loss"] == pytest.approx(upcast["loss"], rel=1e-6)


def test_max_batches_and_training_mode():
    model = TableLM(torch.zeros(8, 8))
    model.train()
    rows = torch.zeros(7, 4, dtype=torch.long)
    result = evaluate_perplexity(model, rows, 3, "cpu", max_batches=2)
    assert model.calls == [(3, 4), (3, 4)] and result["tokens"] == 6 * 3
    assert result["loss"] == pytest.approx(math.log(8))  # uniform logits
    assert model.training, "the caller's mode is restored"
    hf = tiny_llama().train()
    evaluate_perplexity(hf, rows, 4, "cpu")
    assert hf.training


@pytest.mark.parametrize("rows, kwargs, message", [
    (torch.zeros(4, dtype=torch.long), {}, r"rows must be integer token ids of shape \[N, L >= 2\]"),
    (torch.zeros(4, 1, dtype=torch.long), {}, r"shape \[N, L >= 2\], got torch.int64 \(4, 1\)"),
    (torch.zeros(2, 4), {}, r"got torch.float32"),
    (torch.zeros(0, 4, dtype=torch.long), {}, "rows is empty"),
    (torch.zeros(2, 4, dtype=torch.long), {"batch_size": 0}, "batch_size must be >= 1, got 0"),
    (torch.zeros(2, 4, dtype=torch.long), {"max_batches": 0}, "max_batches must be >= 1 or None, got 0"),
])
def test_bad_inputs_are_named(rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(TableLM(torch.zeros(8, 8)), rows, kwargs.get("batch_size", 2), "cpu",
                            kwargs.get("max_batches"))


def test_token_ids_beyond_the_vocabulary_are_named():
    with pytest.raises(ValueError, match="rows hold token id 64 but the model's vocabulary has 64 tokens"):
        evaluate_perplexity(tiny_llama(64), torch.full((2, 4), 64), 2, "cpu")

    class Ignores(torch.nn.Module):  # no config: caught from the logits' width instead
        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 8))

    with pytest.raises(ValueError, match="rows hold token id 9 but the model has only 8 logits"):
        evaluate_perplexity(Ignores(), torch.full((2, 4), 9), 2, "cpu")


def _rank_main(rank: int, world: int, port: int, table, rows, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        share = rows[rank::world]  # unequal token counts per rank are fine for a plain module
        results.put((rank, evaluate_perplexity(TableLM(table), share, 2, "cpu", distributed=True)))
    finally:
        dist.destroy_process_group()


def test_distributed_sums_over_ranks():
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    rows = torch.randint(0, 16, (5, 6), generator=torch.Generator().manual_seed(1))
    expected = evaluate_perplexity(TableLM(table), rows, 2, "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a forked child that runs torch ops after the parent did can deadlock in OpenMP.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_rank_main, args=(r, 2, port, table, rows, results)) for r in range(2)]
    try:
        for p in ranks:
            p.start()
        got = dict(results.get(timeout=120) for _ in ranks)
        for p in ranks:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        assert got[rank]["tokens"] == expected["tokens"] == 5 * 5
        assert got[rank]["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # fp32 sums in other groupings


# ----------------------------------------------------------------------------------------------------
# launch/evaluate.py


def _launcher():
    return load_launch_script("evaluate")


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --model"),
    (["--model", "m", "--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got 1"),
    (["--model", "m", "--batch-size", "two"], "argument --batch-size: expected an integer >= 1, got 'two'"),
    (["--model", "m", "--eval-fraction", "1.5"], r"argument --eval-fraction: expected a number in \(0, 1\), got 1.5"),
    (["--model", "m", "--task", "no-such-task"], "argument --task: invalid choice: 'no-such-task'"),
    (["--model", "m", "--device", "tpu9"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu9'"),
])
def test_launcher_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _launcher().main(argv)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_launcher_reports_a_missing_model_in_one_line(capsys):
    assert _launcher().main(["--model", "./no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err == "error: local path './no/such/model' does not exist\n"


def test_launcher_takes_a_run_directory_for_its_model(tmp_path):
    (tmp_path / "hf_model").mkdir()
    (tmp_path / "hf_model" / "config.json").write_text("{}")
    launcher = _launcher()
    assert launcher.resolve_model_argument(str(tmp_path)) == str(tmp_path / "hf_model")
    assert launcher.resolve_model_argument("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_launcher_explains_that_a_step_checkpoint_is_not_a_model(tmp_path, capsys):
    from kvforge.trainer.checkpoint import MANIFEST, TRAINER_STATE

    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / MANIFEST).write_text("{}")
    (step / TRAINER_STATE).write_text("{}")
    assert _launcher().main(["--model", str(step)]) == 2
    err = capsys.readouterr().err
    assert "is a DeepSpeed training checkpoint" in err and f"--model {tmp_path / 'run'}" in err


@pytest.mark.real_model
def test_launcher_perplexity_on_smollm2_equals_a_plain_transformers_forward(smollm2_dir, tmp_path, capsys):
    """4 rows x 256 tokens of the stdlib-docstrings eval split: the launcher's number equals
    `model(input_ids, labels=input_ids).loss` of an independently loaded transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvforge.trainer.data import build_packed_datasets

    data_cache = tmp_path / "data"
    out = tmp_path / "eval.json"
    argv = ["--model", "smollm2-135m-instruct", "--data", "stdlib-docstrings", "--max-documents", "300",
            "--seq-len", "256", "--batch-size", "4", "--max-batches", "1", "--device", "cpu",
            "--cache-dir", str(data_cache), "--json", str(out)]
    assert _launcher().main(argv) == 0
    assert "perplexity " in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["tokens"] == 4 * 255 and report["rows"] == 4
    assert report["data"]["document_separator_id"] == 0

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    settings = {k: report["data"][k] for k in ("source", "seq_len", "eval_fraction", "max_documents", "seed")}
    packed = build_packed_datasets({**settings, "cache_dir": str(data_cache)}, tokenizer, 0)
    assert packed.stats["cache_hit"]
    input_ids = packed.eval[:4].long()
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    assert report["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert 1.5 < report["perplexity"] < 50, "a trained model on English/Python text"


# ----------------------------------------------------------------------------------------------------
# launch/evaluate.py --task suite, the training-source guard, plain text folders, launch/plot_results.py


@pytest.fixture(scope="module")
def suite_models(tmp_path_factory):
    """A tiny random Llama and a tiny KVForge model (layer 0 a 16-token window) with SmolLM2's tokenizer, and
    a folder of plain text files without a suffix, as Debian's fortunes ships them (with a binary .dat
    index and a .u8 link to a file already there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvforge.models.configuration_kvforge import KVForgeConfig
    from kvforge.models.loading import load_tokenizer
    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    root = tmp_path_factory.mktemp("suite")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(root / "llama")
    KVForgeForCausalLM(KVForgeConfig(**dims, compression={"layers": [{"attention": "window", "window": 16}, {}]})
                       ).save_pretrained(root / "kvforge")
    for name in ("llama", "kvforge"):
        tokenizer.save_pretrained(root / name)
    text = root / "fortunes"
    text.mkdir()
    for i in range(12):
        (text / f"topic{i}").write_text("\n%\n".join(f"Fortune {i}.{j}: the early bird gets the worm, but the second "
                                                    f"mouse gets the cheese ({i * j})." for j in range(40)))
    (text / "topic0.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (text / "topic0.u8").symlink_to("topic0")
    return root


def _suite_argv(root, model, out, *extra):
    return ["--task", "suite", "--model", str(model), "--data", str(root / "fortunes"), "--seq-len", "32",
            "--eval-fraction", "0.3", "--batch-size", "2", "--max-batches", "2", "--context-lens", "128", "200",
            "--depths", "0,1", "--samples", "1", "--device", "cpu", "--cache-dir", str(root / "cache"),
            "--json", str(out), *extra]


def test_suite_writes_every_part_with_the_right_types(suite_models, tmp_path, capsys):
    out = tmp_path / "kvforge.json"
    assert _launcher().main(_suite_argv(suite_models, suite_models / "kvforge", out, "--label", "window16")) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "suite" and report["label"] == "window16" and report["role"] == "compressed"

    ppl = report["perplexity"]
    assert isinstance(ppl["perplexity"], float) and ppl["perplexity"] > 1 and ppl["tokens"] == 2 * 2 * 31
    assert ppl["data"]["source"] == str(suite_models / "fortunes")  # what results are compared by
    assert ppl["data"]["staged"]["files"] == 12 and ppl["data"]["staged"]["skipped_binary"] == 1

    # The passkey part: one entry per context length, prompts within that length, one record per depth.
    assert list(report["passkey"]) == ["128", "200"]
    for context_len, part in report["passkey"].items():
        assert part["context_len"] == int(context_len) and isinstance(part["accuracy"], float)
        assert 0.0 <= part["accuracy"] <= 1.0 and set(part["per_depth"]) == {"0", "1"}
        assert len(part["records"]) == 2 and all(r["prompt_tokens"] <= int(context_len) for r in part["records"])
        assert part["cache"] == {"pyramid": None}

    # The cache generate() allocated over 200 prompt tokens + 3 fed back: layer 0 keeps 16 slots, layer 1 all 203
    kv = report["kv_cache"]
    original = 2 * 2 * 2 * 8 * 2  # layers x (K, V) x kv heads x head_dim x bf16 bytes
    assert kv["original_bytes_per_token"] == original and kv["dtype"] == "bfloat16" and kv["tokens"] == 203
    assert kv["total_bytes"] == (16 + 203) * original // 2  # per layer: original // 2 bytes a slot
    assert kv["bytes_per_token"] == pytest.approx(kv["total_bytes"] / 203)
    assert kv["fraction_of_original"] == pytest.approx(kv["bytes_per_token"] / original)
    assert report["training_source_check"] is None
    assert "window16 (compressed): perplexity" in capsys.readouterr().out


def test_suite_measures_a_plain_models_dynamic_cache_and_calls_it_the_original(suite_models, tmp_path):
    out = tmp_path / "llama.json"
    assert _launcher().main(_suite_argv(suite_models, suite_models / "llama", out, "--kv-tokens", "40")) == 0
    report = json.loads(out.read_text())
    assert report["role"] == "original" and report["label"] == str(suite_models / "llama")
    kv = report["kv_cache"]
    assert kv["bytes_per_token"] == kv["original_bytes_per_token"] == 128 and kv["prompt_tokens"] == 40
    assert "DynamicCache" in kv["measured_from"]


def test_suite_refuses_lengths_past_the_model_and_a_chosen_passkey_cache(suite_models, tmp_path, capsys):
    launcher = _launcher()
    argv = _suite_argv(suite_models, suite_models / "llama", tmp_path / "x.json")
    with pytest.raises(SystemExit) as exit_:
        launcher.main(argv[:argv.index("--context-lens") + 1] + ["128", "1024"] + argv[argv.index("200") + 1:])
    assert exit_.value.code == 2
    assert "--context-lens [1024] exceed the model's max_position_embeddings (512)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launcher.main(argv + ["--pyramid-budget", "32"])
    assert "--pyramid-budget would make its passkey and KV numbers disagree" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _fake_run(root: Path, model_dir: Path, data: dict, calibration: str | None = None) -> Path:
    import shutil

    import yaml

    run = root / "run"
    shutil.copytree(model_dir, run / "hf_model")
    config = {"run": {"name": "r"}, "data": data}
    if calibration is not None:
        config["compression"] = {"calibration": {"source": calibration}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_a_run_is_not_evaluated_on_what_it_trained_on(suite_models, tmp_path, capsys):
    fortunes = suite_models / "fortunes"
    run = _fake_run(tmp_path, suite_models / "llama", {"source": str(fortunes), "mix": []})
    launcher = _launcher()
    argv = _suite_argv(suite_models, run, tmp_path / "run.json")
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: eval data '{fortunes}' is what run {run} trained on (data.source='{fortunes}'")
    assert str(run / "config.yaml") in err and "--allow-training-source" in err
    assert not (tmp_path / "run.json").exists()

    # A file inside the training folder is training data too; another source is fine.
    with pytest.raises(evaluation.TrainingSourceError, match="data.source"):
        evaluation.check_eval_source(run, str(fortunes / "topic3"))
    assert evaluation.check_eval_source(run, "stdlib-docstrings")["overlaps"] == []
    allowed = evaluation.check_eval_source(run, str(fortunes), allow=True)
    assert allowed["allowed"] and allowed["overlaps"] == ["data.source", "compression.calibration.source"]

    # With the override the suite runs and records the check.
    assert launcher.main(argv + ["--allow-training-source"]) == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["training_source_check"]["allowed"] and report["role"] == "finetuned-original"


def test_training_sources_cover_a_mix_and_the_calibration_source(tmp_path):
    config = {"data": {"source": "python-docs", "mix": [{"source": "teacher-samples", "weight": 1},
                                                         {"source": "/data/web", "weight": 1}]},
              "compression": {"calibration": {"source": "stdlib-docstrings"}}}
    assert evaluation.run_training_sources(config) == {
        "data.mix[1].source": "/data/web", "compression.calibration.source": "stdlib-docstrings"}
    assert evaluation.run_training_sources({"data": {"source": "wikitext"}}) == {
        "data.source": "wikitext", "compression.calibration.source": "wikitext"}
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        evaluation.check_eval_source(tmp_path, "python-docs")


def test_plain_text_folder_is_staged_and_suffixed_sources_are_left_alone(tmp_path):
    from kvforge.trainer.data import build_packed_datasets  # noqa: F401  (the reader the staged folder is for)

    text = tmp_path / "text"
    (text / "sub").mkdir(parents=True)
    (text / "a").write_text("alpha")
    (text / "sub" / "b").write_text("beta")
    (text / "a.dat").write_bytes(b"\x00\x01")
    (text / "a.u8").symlink_to("a")
    (text / ".hidden").write_text("no")
    staged, info = evaluation.plain_text_source(str(text), tmp_path / "stage")
    assert info == {"staged_from": str(text.resolve()), "staged_as": staged, "files": 2, "skipped_binary": 1}
    names = sorted(p.relative_to(staged).as_posix() for p in Path(staged).rglob("*.txt"))
    assert names == ["a.txt", "sub/b.txt"] and (Path(staged) / "a.txt").read_text() == "alpha"
    assert evaluation.plain_text_source(str(text), tmp_path / "stage")[0] == staged  # same folder: cache stays valid

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("x")
    assert evaluation.plain_text_source(str(tmp_path / "docs"), tmp_path / "stage") == (str(tmp_path / "docs"), None)
    assert evaluation.plain_text_source("python-docs", tmp_path / "stage") == ("python-docs", None)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "blob").write_bytes(b"\x00" * 10)
    with pytest.raises(FileNotFoundError, match="holds no text files: 1 binary files"):
        evaluation.plain_text_source(str(tmp_path / "bin"), tmp_path / "stage")


def _plot_launcher():
    return load_launch_script("plot_results")


def _fake_result(path: Path, label: str, role: str, perplexity: float, kv: float, passkey: dict) -> Path:
    path.write_text(json.dumps({
        "task": "suite", "label": label, "role": role,
        "perplexity": {"perplexity": perplexity, "loss": math.log(perplexity), "tokens": 8 * 1023,
                       "data": {"source": "/usr/share/games/fortunes", "seq_len": 1024, "seed": 0}},
        "passkey": {n: {"accuracy": a} for n, a in passkey.items()},
        "kv_cache": {"bytes_per_token": kv, "original_bytes_per_token": 23040.0}}))
    return path


def test_plot_writes_a_png_from_three_results(tmp_path, capsys):
    paths = [_fake_result(tmp_path / "orig.json", "SmolLM2", "original", 16.3, 23040, {"4096": 1.0}),
             _fake_result(tmp_path / "ft.json", "SmolLM2 finetuned", "finetuned-original", 15.2, 23040, {"4096": 1.0}),
             _fake_result(tmp_path / "lr50.json", "low-rank 50%", "compressed", 16.1, 11520, {"2048": 1.0})]
    out = tmp_path / "plots" / "q.png"
    assert _plot_launcher().main([str(p) for p in paths] + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "3 results, 2 with passkey at 4096" in capsys.readouterr().out


@pytest.mark.parametrize("breaks, message", [
    (lambda d: d["kv_cache"].pop("bytes_per_token"), "missing field 'kv_cache.bytes_per_token'"),
    (lambda d: d.pop("role"), "missing field 'role'"),
    (lambda d: d["perplexity"].update(perplexity="low"), "field 'perplexity.perplexity' is 'low'; expected int or float"),
    (lambda d: d.update(role="baseline"), "field 'role' is 'baseline'; expected one of original, finetuned-original"),
    (lambda d: d["perplexity"]["data"].update(seq_len=512), "perplexity.data.seq_len is 512 but .*good.json has 1024"),
])
def test_plot_refuses_an_input_without_what_it_needs_naming_file_and_field(tmp_path, capsys, breaks, message):
    good = _fake_result(tmp_path / "good.json", "a", "original", 16.3, 23040, {})
    bad = _fake_result(tmp_path / "bad.json", "b", "compressed", 16.0, 11520, {})
    payload = json.loads(bad.read_text())
    breaks(payload)
    bad.write_text(json.dumps(payload))
    out = tmp_path / "q.png"
    assert _plot_launcher().main([str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and re.search(message, err), err
    assert not out.exists()
