"""models/loading.py: name resolution and its errors, random init per family, GGUF conversion safety,
special tokens, and (real_model) the embedded SmolLM2 conversion against the GGUF-loaded model."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch

from kvforge.models import loading
from kvforge.models.loading import ModelLoadError, load_pretrained

VOCAB = ["<|endoftext|>", "<s>", "</s>", *[f"w{i}" for i in range(61)]]  # 64 tokens

TINY = {  # per family: a config small enough to build in milliseconds
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, sliding_window=16),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}


def save_tokenizer(directory: Path, vocab=VOCAB, **special) -> None:
    """A word-level fast tokenizer: real tokenizer files, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = special or dict(bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(directory)


def make_model_dir(directory: Path, model_type: str, **config) -> Path:
    """A directory with a config (big enough that overrides visibly shrink it) and a tokenizer."""
    from transformers import AutoConfig

    defaults = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)
    AutoConfig.for_model(model_type, **{**defaults, **config}).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


# ----------------------------------------------------------------------------------------------------
# Errors


def test_unknown_architecture_names_the_model_type_and_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(VOCAB)).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    for init in ("pretrained", "random"):
        with pytest.raises(ModelLoadError) as err:
            load_pretrained(str(tmp_path), init=init)
        assert "'gpt2'" in str(err.value) and "llama, mistral, qwen2" in str(err.value)


def test_a_model_type_transformers_does_not_know_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelLoadError, match="llama, mistral, qwen2"):
        loading.config_for(str(tmp_path))


@pytest.mark.parametrize("name, message", [
    ("./does/not/exist", "local path './does/not/exist' does not exist"),
    ("runs/x/hf_model", "local path 'runs/x/hf_model' does not exist"),
    ("/nowhere/model.gguf", "GGUF file '/nowhere/model.gguf' does not exist"),
    ("", "model name must be"),
])
def test_missing_local_paths_are_named(name, message):
    with pytest.raises(ModelLoadError, match="^" + message.replace(".", r"\.")):
        load_pretrained(name)


def test_files_and_directories_that_are_not_models_are_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="notes.txt' is a file; expected a Hugging Face model directory"):
        load_pretrained(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file 'missing.gguf' not found in directory"):
        load_pretrained(str(tmp_path), gguf_file="missing.gguf")


EXPECTED_HUB_ERROR = ("model 'kvforge-test/no-such-model' is neither a local directory nor a .gguf file, and could "
                      "not be fetched from the Hugging Face hub (offline?)")


def test_offline_hub_id_fails_fast_in_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    from transformers import AutoConfig  # noqa: F401  (pay the import here: time only the call)

    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pretrained("kvforge-test/no-such-model")
    assert time.perf_counter() - started < 5.0
    message = str(err.value)
    assert message.startswith(EXPECTED_HUB_ERROR) and "HF_HUB_OFFLINE" in message
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """Not offline, but the endpoint refuses connections: one probe, no ~25 s retry storm."""
    import huggingface_hub.constants

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pretrained("kvforge-test/no-such-model")
    assert time.perf_counter() - started < 5.0
    assert str(err.value).startswith(EXPECTED_HUB_ERROR) and "cannot be reached" in str(err.value)


def test_bad_arguments_are_named(tmp_path):
    make_model_dir(tmp_path, "llama")
    with pytest.raises(ModelLoadError, match="init must be one of pretrained, random, got 'zeros'"):
        load_pretrained(str(tmp_path), init="zeros")
    with pytest.raises(ModelLoadError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        load_pretrained(str(tmp_path), dtype="int8")
    with pytest.raises(ModelLoadError, match="'hiden_size' is not a field of LlamaConfig.*did you mean 'hidden_size'"):
        load_pretrained(str(tmp_path), init="random", config_overrides={"hiden_size": 64})
    with pytest.raises(ModelLoadError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        load_pretrained(str(tmp_path), init="random", config_overrides={**TINY["llama"], "num_key_value_heads": 3})
    with pytest.raises(ModelLoadError, match="tokenizer .* has 64 tokens but model .* vocab_size=32"):
        load_pretrained(str(tmp_path), init="random", config_overrides={**TINY["llama"], "vocab_size": 32})


# ----------------------------------------------------------------------------------------------------
# Random init and local directories


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_random_init_builds_each_family_with_overrides(tmp_path, model_type):
    make_model_dir(tmp_path, model_type)
    overrides = TINY[model_type]
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(str(tmp_path), init="random", config_overrides=overrides)
    assert model.config.model_type == model_type
    for key, value in overrides.items():
        assert getattr(model.config, key) == value, key
    assert len(model.model.layers) == 2 and model.model.embed_tokens.weight.shape == (len(VOCAB), 32)
    assert not model.training and next(model.parameters()).dtype == torch.float32

    torch.manual_seed(0)
    same, _ = load_pretrained(str(tmp_path), init="random", config_overrides=overrides)
    torch.manual_seed(1)
    other, _ = load_pretrained(str(tmp_path), init="random", config_overrides=overrides)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), f"{name}: the same seed must give the same weights"
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))

    assert len(tokenizer) == len(VOCAB)
    assert model(input_ids=torch.tensor([[4, 5, 6, 7]])).logits.shape == (1, 4, len(VOCAB))


def test_pretrained_local_directory_round_trips(tmp_path):
    """save_pretrained -> load_pretrained gives the same logits, in the requested dtype."""
    from transformers import AutoModelForCausalLM

    source = make_model_dir(tmp_path / "src", "qwen2", **TINY["qwen2"])
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(loading.config_for(str(source))).eval()
    original.save_pretrained(source)
    model, tokenizer = load_pretrained(str(source))
    input_ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    assert torch.equal(model(input_ids=input_ids).logits, original(input_ids=input_ids).logits)
    assert tokenizer.eos_token == "</s>"

    half, _ = load_pretrained(str(source), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_tokenizer_from_elsewhere(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", "llama")
    tokenizer_dir = tmp_path / "t"
    save_tokenizer(tokenizer_dir, vocab=[*VOCAB[:3], *[f"v{i}" for i in range(29)]])
    torch.manual_seed(0)
    _, tokenizer = load_pretrained(str(model_dir), init="random", config_overrides=TINY["llama"],
                                   tokenizer_name=str(tokenizer_dir))
    assert len(tokenizer) == 32 and "v3" in tokenizer.get_vocab()


# ----------------------------------------------------------------------------------------------------
# Special tokens and the document separator


def _tokenizer(tmp_path, vocab=VOCAB, **special):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path, vocab, **special)
    return AutoTokenizer.from_pretrained(tmp_path)


def test_fix_special_tokens_follows_the_config(tmp_path):
    from types import SimpleNamespace

    tokenizer = _tokenizer(tmp_path, bos_token="<s>", eos_token="<s>", unk_token="<|endoftext|>")
    changed = loading.fix_special_tokens(tokenizer, SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert changed == ["eos: '<s>' (1) -> '</s>' (2)", "pad: None (None) -> '</s>' (2)"]
    # Ids outside the vocabulary and lists of stop ids leave the tokenizer as it is.
    assert loading.fix_special_tokens(tokenizer, SimpleNamespace(bos_token_id=999, eos_token_id=[2, 3])) == []


def test_document_separator_prefers_the_end_of_document_token(tmp_path):
    from types import SimpleNamespace

    with_endoftext = _tokenizer(tmp_path / "a", bos_token="<s>", eos_token="</s>")
    assert loading.document_separator_id(with_endoftext, SimpleNamespace(eos_token_id=2)) == 0
    no_endoftext = ["<unk>", "<s>", "</s>", "w"]
    assert loading.document_separator_id(_tokenizer(tmp_path / "b", no_endoftext, eos_token="</s>"), None) == 2
    bare = _tokenizer(tmp_path / "c", no_endoftext, unk_token="<unk>")
    assert loading.document_separator_id(bare, SimpleNamespace(eos_token_id=[1, 2])) == 1
    with pytest.raises(ModelLoadError, match="cannot tell which token separates documents"):
        loading.document_separator_id(bare, SimpleNamespace(eos_token_id=None))


# ----------------------------------------------------------------------------------------------------
# Converting a GGUF file once: crash safety and concurrency (the conversion itself is faked here; the
# real one is checked on SmolLM2 below)


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"from": gguf_path.name}))
    delay = float(os.environ.get("FAKE_CONVERT_DELAY", "0"))
    time.sleep(delay)
    with open(gguf_path.with_suffix(".calls"), "a") as f:
        f.write(f"{os.getpid()}\n")


def _calls(gguf_path: Path) -> int:
    calls = gguf_path.with_suffix(".calls")
    return len(calls.read_text().split()) if calls.exists() else 0


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_convert_gguf", _fake_convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


def test_conversion_recovers_from_a_crash(tmp_path, fake_gguf):
    out = tmp_path / "cache" / "tiny"
    # What a conversion killed half-way leaves: its tmp folder, and an older incomplete folder.
    crashed_tmp = out.with_name(".tiny.tmp-999999")
    crashed_tmp.mkdir(parents=True)
    (crashed_tmp / "model.safetensors").write_bytes(b"trunc")
    out.mkdir()
    (out / "half-written").write_text("x")

    assert loading.convert_gguf_once(fake_gguf, out) == out
    assert json.loads((out / "config.json").read_text()) == {"from": "tiny.gguf"}
    marker = json.loads((out / loading.CONVERTED_MARKER).read_text())
    assert marker["gguf_file"] == "tiny.gguf" and marker["conversion_version"] == loading.CONVERSION_VERSION
    assert not (out / "half-written").exists() and not crashed_tmp.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [".tiny.lock", "tiny"]

    # Complete and up to date: not converted again. A changed GGUF file: converted again.
    loading.convert_gguf_once(fake_gguf, out)
    assert _calls(fake_gguf) == 1
    fake_gguf.write_bytes(b"GGUF" + bytes(100))
    loading.convert_gguf_once(fake_gguf, out)
    assert _calls(fake_gguf) == 2


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, fake_gguf, monkeypatch):
    out = tmp_path / "cache" / "tiny"

    def crash(gguf_path, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        loading.convert_gguf_once(fake_gguf, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [".tiny.lock"]
    monkeypatch.setattr(loading, "_convert_gguf", _fake_convert)
    loading.convert_gguf_once(fake_gguf, out)
    assert (out / loading.CONVERTED_MARKER).is_file()


def _convert_in_child(gguf: str, out: str, results) -> None:
    path = loading.convert_gguf_once(Path(gguf), Path(out))
    results.put(sorted(p.name for p in path.iterdir()))


def test_concurrent_callers_convert_once(tmp_path, fake_gguf, monkeypatch):
    """Two processes (like two deepspeed ranks) ask at once: one converts, the other waits and reuses."""
    monkeypatch.setenv("FAKE_CONVERT_DELAY", "0.5")
    out = tmp_path / "cache" / "tiny"
    context = multiprocessing.get_context("fork")  # the children inherit the faked conversion
    results = context.Queue()
    children = [context.Process(target=_convert_in_child, args=(str(fake_gguf), str(out), results))
                for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    listings = [results.get(timeout=5) for _ in children]
    assert listings == [["config.json", loading.CONVERTED_MARKER]] * 2
    assert _calls(fake_gguf) == 1


# ----------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real_model
def test_embedded_smollm2_converted_directory_matches_the_gguf_model(smollm2_dir):
    """The converted directory (read from the installed package, never downloaded) gives bit-identical
    logits to transformers' own GGUF loading, and its tokenizer has SmolLM2-Instruct's special tokens."""
    from transformers import AutoModelForCausalLM

    assert smollm2_dir == loading.models_cache_dir() / loading.EMBEDDED_MODEL
    marker = json.loads((smollm2_dir / loading.CONVERTED_MARKER).read_text())
    assert marker["gguf_file"] == loading.EMBEDDED_GGUF_FILE
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "generation_config.json").is_file()

    started = time.perf_counter()
    model, tokenizer = load_pretrained(loading.EMBEDDED_MODEL)
    converted_seconds = time.perf_counter() - started
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size,
            c.vocab_size, c.tie_word_embeddings) == ("llama", 30, 9, 3, 576, 49152, True)
    assert c.head_dim == 64 and c.rope_parameters["rope_theta"] == 100000.0
    assert not hasattr(c, "quantization_config")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert loading.document_separator_id(tokenizer, c) == 0
    assert tokenizer.model_max_length == 8192

    gguf = loading.embedded_gguf_path()
    started = time.perf_counter()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    gguf_seconds = time.perf_counter() - started
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    input_ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        got = model(input_ids=input_ids).logits
    assert torch.equal(got, expected)
    print(f"\nload: converted directory {converted_seconds:.1f} s, GGUF {gguf_seconds:.1f} s")


# ----------------------------------------------------------------------------------------------------
# ZeRO-3: parameters are partitioned as load_pretrained creates them


ZERO3_SCRIPT = r"""
import os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed, torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
from kvforge.models import loading

model_dir = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
plain = AutoModelForCausalLM.from_pretrained(model_dir)
hf_ds = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
with loading._zero3_disabled():  # what GGUF conversion runs under
    assert not is_deepspeed_zero3_enabled()
assert is_deepspeed_zero3_enabled()

model, _ = loading.load_pretrained(model_dir)
params = dict(model.named_parameters())
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()), "not partitioned at load"
with deepspeed.zero.GatheredParameters(list(params.values())):
    for name, p in plain.named_parameters():
        assert torch.equal(params[name].data, p.data), name
torch.manual_seed(0)
random_model, _ = loading.load_pretrained(model_dir, init="random", config_overrides={"num_hidden_layers": 1})
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in random_model.parameters())
print("ZERO3-OK")
"""


@pytest.mark.distributed
def test_zero3_partitions_parameters_at_load_time(tmp_path):
    """Under a live HfDeepSpeedConfig (stage 3), pretrained and random models come back partitioned, and
    the gathered pretrained weights equal the checkpoint's. A subprocess keeps torch.distributed and
    DeepSpeed's global state out of the test process."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model_dir = make_model_dir(tmp_path, "llama", **TINY["llama"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(loading.config_for(str(model_dir))).save_pretrained(model_dir)
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(model_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ZERO3-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": "abc"}, "config override hidden_size='abc' has the wrong type: LlamaConfig.hidden_size is a int"),
    ({"rms_norm_eps": True}, "rms_norm_eps=True has the wrong type"),
])
def test_override_of_the_wrong_type_is_named(overrides, message):
    with pytest.raises(loading.ModelLoadError, match=re.escape(message)):
        loading.load_pretrained(loading.EMBEDDED_MODEL, init="random", config_overrides=overrides)
