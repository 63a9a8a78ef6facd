"""Export: a tiny compressed run trained with the real launcher (ZeRO-2) -> export -> a fresh Python process
where kvforge cannot be imported loads it with plain transformers and generates the same tokens; plain
models, sharding, LoRA merging, the model card; every bad input and an export killed half-way.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.export import (
    EXPORT_MANIFEST,
    ExportError,
    export_model,
    export_pretrained,
    verify_export,
    weight_files,
)
from kvforge.models.modeling_kvforge import KVForgeForCausalLM
from kvforge.trainer.export_run import (
    check_state_dict,
    consolidate_checkpoint,
    export_checkpoint,
    export_run,
    load_run_weights,
)

REPO = Path(__file__).resolve().parents[2]
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)
# Every method at once: a low-rank latent layer cached in 8 bits, a sliding window with sinks and merged heads cached
# in 4 bits, a kv_from reader, a probs_from reader.
LAYERS = [
    {"kv_proj": "low_rank", "k_rank": 12, "v_rank": 12, "rope": "pre_rope_latent", "cache_bits": 8},
    {"attention": "window", "window": 16, "sinks": 2, "kv_proj": "merged_heads", "num_kv_heads": 1, "cache_bits": 4},
    {"attention": "window", "window": 16, "sinks": 2, "kv_from": 1},
    {"probs_from": 0},
]
RUN_CONFIG = f"""
run: {{name: export-test, seed: 0}}
model:
  name: smollm2-135m-instruct
  init: random
  config: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4, num_attention_heads: 4,
           num_key_value_heads: 2, head_dim: 16}}
compression:
  layers: {json.dumps(LAYERS)}
  calibration: {{tokens: 1024, seq_len: 64}}
data: {{source: stdlib-docstrings, seq_len: 64, max_documents: 100, eval_fraction: 0.1}}
training: {{max_steps: 2, micro_batch_size: 2, grad_accum: 1, lr: 1.0e-2, warmup_steps: 1, precision: fp32,
           eval_every: 0, eval_batches: 1}}
deepspeed: {{zero_stage: 2}}
checkpoint: {{save_every: 2, keep_last: 1}}
logging: {{wandb: disabled}}
eval: {{batch_size: 2, at_start: false}}
"""


# Tiny matmuls gain nothing from threads (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from kvforge.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """launch/train.py, one process, ZeRO-2: surgery into compressed_init, 2 steps, a checkpoint."""
    root = tmp_path_factory.mktemp("run")
    config = root / "config.yaml"
    config.write_text(RUN_CONFIG)
    run_dir = root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(config),
                             f"run.output_dir={run_dir}"], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_00000002" / "MANIFEST.json").is_file()
    return run_dir


def run_model(run_dir: Path):
    """The trained model in memory, as export rebuilds it (fp32)."""
    from kvforge.trainer.export_run import build_run_model, run_config

    model, _ = build_run_model(run_config(run_dir), run_dir)
    state = consolidate_checkpoint(run_dir / "checkpoints" / "step_00000002")
    return load_run_weights(model, state, where="test").eval()


def run_without_kvforge(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python without site (so no .pth file installs kvforge's editable finder), only the venv's
    site-packages on the path, started outside the repo (whose kvforge/ folder would import)."""
    guard = textwrap.dedent("""
        try:
            import kvforge
        except ImportError:
            pass
        else:
            raise SystemExit(f"kvforge is importable here: {kvforge.__file__}")
    """)
    return subprocess.run([sys.executable, "-S", "-c", guard + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=600, cwd=cwd,
                          env={"PYTHONPATH": SITE_PACKAGES, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "HOME": str(cwd), "HF_MODULES_CACHE": str(cwd / "modules"), "PATH": "/usr/bin:/bin"})


def tiny_kvforge(layers=LAYERS, seed=0, vocab=49152) -> KVForgeForCausalLM:
    torch.manual_seed(seed)
    config = KVForgeConfig(**TINY, num_hidden_layers=len(layers), vocab_size=vocab, initializer_range=0.1,
                           tie_word_embeddings=True, compression={"layers": layers})
    return KVForgeForCausalLM(config).eval()


def tiny_llama(seed=0, vocab=49152) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in TINY.items()}, num_hidden_layers=2, vocab_size=vocab,
                         initializer_range=0.1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 504, 2328, 314, 260, 1345, 30, 339, 1033, 28, 2112, 282, 4466, 30, 378, 9, 17, 2208]])


# ---------------------------------------------------------------------------------------------------
# The round trip


def test_trained_run_round_trips_into_a_process_without_kvforge(trained_run, tmp_path):
    out = tmp_path / "export"
    result = export_run(trained_run, out, dtype="float32")
    assert result.kvforge and result.source["step"] == 2
    assert {"modeling_kvforge.py", "configuration_kvforge.py", "pyramid.py", "dispatch.py", "latent_attention.py",
            "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            EXPORT_MANIFEST} <= set(os.listdir(out))
    assert "    from .dispatch import fused_attention, fused_slot_write\n" in (out / "modeling_kvforge.py").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_kvforge.KVForgeConfig",
                                  "AutoModelForCausalLM": "modeling_kvforge.KVForgeForCausalLM"}
    assert [layer.get("kv_from") for layer in config["compression"]["layers"]] == [None, None, 1, None]
    verify_export(out)

    model = run_model(trained_run)
    with torch.no_grad():
        expected = model.generate(IDS, max_new_tokens=12, do_sample=False)
        from kvforge.models.pyramid import new_pyramid_cache

        cache = new_pyramid_cache(model, budget=14, window=4, sinks=2)
        expected_pyramid = model.generate(IDS, max_new_tokens=12, do_sample=False, past_key_values=cache)
    torch.save({"ids": IDS, "tokens": expected, "pyramid": expected_pyramid}, tmp_path / "expected.pt")

    script = f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert not any(m == "kvforge" or m.startswith("kvforge.") for m in sys.modules)
        dispatch = sys.modules[type(model).__module__].fused_attention  # the bundled kernel dispatch
        assert dispatch is not None and dispatch.__module__.endswith(".dispatch"), dispatch
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model.generate(expected["ids"], max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected["tokens"]), (out.sequences, expected["tokens"])
            cache = out.past_key_values
            assert type(cache).__name__ == "KVForgeCache"
            tokens = cache.get_seq_length()
            assert cache.cache_bytes() == model.config.kv_cache_bytes(tokens, torch.float32), cache.cache_bytes()
            new_pyramid_cache = get_class_from_dynamic_module("pyramid.new_pyramid_cache", {str(out)!r})
            pyramid = new_pyramid_cache(model, budget=14, window=4, sinks=2)
            again = model.generate(expected["ids"], max_new_tokens=12, do_sample=False, past_key_values=pyramid)
            assert torch.equal(again, expected["pyramid"]), (again, expected["pyramid"])
            assert pyramid.pyramid.kept, "PyramidKV did not compact anything"
        print("ok", type(model).__module__)
    """
    child = run_without_kvforge(script, tmp_path)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    assert child.stdout.startswith("ok transformers_modules.")


def test_an_exported_model_decodes_the_same_with_and_without_its_cache(tmp_path, tokenizer):
    """transformers 5.24 hands generate()'s cache to forward() as `cache`; the modeling code read only
    `past_key_values`, so each step started an empty cache and cached greedy decoding went wrong while training
    and uncached forwards were fine. Checked where users meet it: an exported directory, a process without
    kvforge, a batch of two left-padded prompts, cached == uncached greedy tokens."""
    out = tmp_path / "export"
    manifest = export_model(tiny_kvforge(), tokenizer, out, dtype="float32")
    assert manifest.kvforge
    recorded = json.loads((out / EXPORT_MANIFEST).read_text())
    assert recorded["decoding_check"]["max_margin"] < 1e-3 and recorded["transformers"]["tested"]
    script = f"""
        import sys, torch, transformers
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        ids = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 504, 2328, 314, 260, 1345],
                            [1, 504, 2328, 314, 260, 1345, 30, 339, 1033, 28, 2112, 282, 4466]])
        mask = (torch.arange(ids.shape[1]) >= torch.tensor([[7], [0]])).long()
        with torch.no_grad():
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
            uncached = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                                      use_cache=False)
        assert torch.equal(cached, uncached), (cached[:, 13:], uncached[:, 13:])
        check = sys.modules[type(model).__module__].check_cached_decoding(model)
        print("ok", transformers.__version__, check)
    """
    child = run_without_kvforge(script, tmp_path)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    assert child.stdout.startswith("ok ")


def test_a_low_bit_cache_allows_a_rounding_level_between_cached_and_uncached_logits_and_float64_none():
    """A value on a rounding level's boundary may round one level apart in the cached and the uncached forward
    (their GEMMs sum in other orders): session 14's CPU main job (8-bit latents) met a 0.0077 margin in float32 and
    exactly 0 in float64. The check allows one level's worth for the cache's smallest bits, never in float64."""
    from kvforge.models.configuration_kvforge import KVForgeConfig
    from kvforge.models.modeling_kvforge import decoding_tolerance

    def config(*bits):
        layers = [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 8, "v_rank": 8, "cache_bits": b}
                  for b in bits]
        return KVForgeConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, vocab_size=128, num_hidden_layers=len(bits), compression={"layers": layers})

    assert decoding_tolerance(config(None, None), torch.float32) == 1e-3
    assert decoding_tolerance(config(8, None), torch.float32) == 0.05
    assert decoding_tolerance(config(8, 4), torch.float32) == 0.25
    assert decoding_tolerance(config(8, 4), torch.bfloat16) == 0.25
    assert decoding_tolerance(config(8, 4), torch.float64) == 1e-6


def test_export_refuses_a_model_whose_cached_decoding_is_wrong(tmp_path, tokenizer, monkeypatch):
    """Right cache bytes, wrong tokens: the byte measurement alone would pass this model."""
    from kvforge.models.modeling_kvforge import LayerStorage

    update = LayerStorage.update

    def sign_flipped(self, plan, new):  # attends over corrupted cache entries (the uncached path never does)
        return {name: -tensor for name, tensor in update(self, plan, new).items()}

    monkeypatch.setattr(LayerStorage, "update", sign_flipped)
    with pytest.raises(ExportError, match="cached decoding diverged from the uncached model at row"):
        export_model(tiny_kvforge(), tokenizer, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()


def test_checkpoint_export_through_the_cli_with_a_model_card(trained_run, tmp_path):
    passkey = {"task": "passkey", "context_len": 4096, "accuracy": 0.9, "cache": {"pyramid": None},
               "per_depth": {"0": {"accuracy": 1.0, "correct": 2, "samples": 2}}}
    (tmp_path / "passkey.json").write_text(json.dumps(passkey))
    out = tmp_path / "cli-export"
    step = trained_run / "checkpoints" / "step_00000002"
    result = subprocess.run([sys.executable, str(REPO / "launch/export.py"), "--checkpoint", str(step), "--out",
                             str(out), "--eval", str(tmp_path / "passkey.json"), "--pyramid-budget", "64",
                             "--pyramid-sinks", "2"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["original_kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 2  # 4 layers, 2 kv heads, head_dim 16, bf16
    card = (out / "README.md").read_text()
    assert f"| original llama (bfloat16) | {summary['original_kv_bytes_per_token']:,} |" in card
    assert "equal to the arithmetic" in card and "| 1 | window 16 + 2 sinks, 1 merged KV heads |" in card
    assert "| training eval split (step 2) |" in card  # the run's own eval, from metrics.jsonl
    assert "| passkey at 4096 tokens, full cache | 0.900 (0: 2/2) |" in card
    config = json.loads((out / "config.json").read_text())
    assert config["compression"]["inference"]["pyramid"] == {"budget": 64, "schedule": "pyramid", "window": 8,
                                                             "pooling": "avgpool", "sinks": 2}
    assert config["dtype"] == "bfloat16"
    manifest = verify_export(out)
    assert manifest["source"]["step"] == 2 and manifest["kv_cache"]["measured"]["tokens"] == 64  # the default

    # The export-time default applies to a plain generate() in a process without kvforge.
    script = f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        assert not any(m == "kvforge" or m.startswith("kvforge.") for m in sys.modules)
        ids = torch.randint(0, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.pyramid.settings.sinks == 2 and cache.pyramid.compacted
        assert cache.pyramid.kept == {{0: 64}}, cache.pyramid.kept  # one global cache group in this layout
        full = model.config.kv_cache_bytes(150 + 3, torch.float32)
        assert cache.cache_bytes() < full, (cache.cache_bytes(), full)  # freed, not masked
        print("ok", cache.cache_bytes(), full)
    """
    child = run_without_kvforge(script, tmp_path)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]


def test_a_run_whose_config_does_not_fit_its_weights_names_the_key_and_shapes(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # The run's architecture now says k_rank 10 where the checkpoint was trained with 12.
    init = run / "compressed_init"
    config = KVForgeConfig.from_pretrained(init)
    config.compression["layers"][0]["k_rank"] = 10
    KVForgeForCausalLM(KVForgeConfig.from_dict(config.to_dict())).save_pretrained(init)
    with pytest.raises(ExportError) as err:
        export_run(run, tmp_path / "out")
    message = str(err.value)
    assert "'model.layers.0.self_attn.k_down.weight' has shape (12, 64)" in message
    assert "expects (10, 64)" in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Plain models, sharding, LoRA


def test_a_plain_model_exports_as_a_plain_directory(tmp_path, tokenizer):
    model = tiny_llama()
    result = export_model(model, tokenizer, tmp_path / "plain", dtype="float32")
    assert not result.kvforge and not list((tmp_path / "plain").glob("*.py"))
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert "An uncompressed model" in (tmp_path / "plain" / "README.md").read_text()


def test_a_plain_llama_exports_with_a_pyramid_default_through_the_cli(tmp_path, tokenizer):
    """PyramidKV needs no manual conversion: export turns a plain Llama into the all-dense KVForge model (the
    same logits) whose config carries the default, and a plain generate() compacts its cache."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    proc = subprocess.run([sys.executable, str(REPO / "launch/export.py"), "--model", str(tmp_path / "llama"),
                           "--out", str(tmp_path / "out"), "--dtype", "float32", "--pyramid-budget", "24",
                           "--pyramid-sinks", "2"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "kvforge" and config["compression"]["inference"]["pyramid"]["budget"] == 24
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
        prompt = torch.randint(3, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
        out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                              return_dict_in_generate=True, pad_token_id=0)
    cache = sys.modules[type(loaded).__module__].generated_cache(out)
    assert cache.pyramid is not None and cache.pyramid.compacted
    assert cache.cache_bytes() < loaded.config.kv_cache_bytes(cache.get_seq_length(), torch.float32)


def test_export_pretrained_reads_any_model_kvforge_loads(tmp_path, tokenizer):
    model = tiny_kvforge()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    result = export_pretrained(str(tmp_path / "src"), tmp_path / "out", dtype="float32")
    assert result.source == {"kind": "model", "path": str(tmp_path / "src")}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_sharded_export_and_missing_weight_files_are_named(tmp_path, tokenizer):
    model = tiny_kvforge()
    out = tmp_path / "sharded"
    export_model(model, tokenizer, out, dtype="float32", max_shard_size="1MB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)

    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with pytest.raises(ExportError, match=f"file {shards[1].name} is missing"):
        verify_export(out)
    with pytest.raises(ExportError, match=f"weight file {shards[1].name} is missing"):
        weight_files(out)

    single = tmp_path / "single"
    export_model(model, tokenizer, single, dtype="float32")
    (single / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(single, trust_remote_code=True)
    with pytest.raises(ExportError, match="file model.safetensors is missing"):
        verify_export(single)


def test_lora_weights_are_merged_into_the_base_weights(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "k_down", "v_up", "down_proj"],
                      init_lora_weights=False)  # random B: the adapters change the outputs
    trained = get_peft_model(tiny_kvforge(seed=0), lora).eval()
    with torch.no_grad():
        expected = trained(IDS).logits
        with trained.disable_adapter():
            assert not torch.allclose(expected, trained(IDS).logits, atol=1e-3)  # the adapters matter
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    skeleton = get_peft_model(tiny_kvforge(seed=1), lora)  # other weights: all of them come from `state`
    merged = load_run_weights(skeleton, state, where="test").eval()
    assert type(merged) is KVForgeForCausalLM and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    result = export_model(trained, tokenizer, tmp_path / "merged", dtype="float32")
    assert not any("lora" in key for keys in weight_files(result.out_dir).values() for key in keys)


def test_consolidation_reads_a_checkpoint_without_zero(tmp_path):
    model = tiny_kvforge()
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    state = consolidate_checkpoint(ckpt)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="zero_pp_rank_\\*_optim_states.pt .* or mp_rank_00_model_states.pt"):
        consolidate_checkpoint(empty)


def test_state_dict_checks_name_the_key():
    model = tiny_kvforge()
    state = model.state_dict()
    with pytest.raises(ExportError, match="'model.layers.0.self_attn.k_down.weight' has shape \\(3, 64\\) but the "
                                          "model built from the run's config expects \\(12, 64\\)"):
        check_state_dict(model, {**state, "model.layers.0.self_attn.k_down.weight": torch.zeros(3, 64)}, "ckpt")
    with pytest.raises(ExportError, match="has weight 'model.layers.2.self_attn.k_proj.weight' \\(8, 8\\) that the "
                                          "model does not have"):
        check_state_dict(model, {**state, "model.layers.2.self_attn.k_proj.weight": torch.zeros(8, 8)}, "ckpt")
    del state["model.norm.weight"]
    with pytest.raises(ExportError, match="lacks 1 weight\\(s\\) the model has, first 'model.norm.weight'"):
        check_state_dict(model, state, "ckpt")
    tied = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    check_state_dict(model, tied, "ckpt")  # tied embeddings may appear once


# ---------------------------------------------------------------------------------------------------
# Bad inputs, and interruption


def test_bad_sources_and_destinations_say_what_is_wrong(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="checkpoint .*/nope does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ExportError, match="run directory .*/nope does not exist"):
        export_run(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ExportError, match="holds no complete checkpoint under checkpoints/"):
        export_run(tmp_path / "empty-run", tmp_path / "out")
    half = tmp_path / "run" / "checkpoints" / "step_00000004"
    half.mkdir(parents=True)  # a step folder without its manifest: never complete
    with pytest.raises(ExportError, match="is not a complete kvforge checkpoint: .*MANIFEST.json"):
        export_checkpoint(half, tmp_path / "out")
    with pytest.raises(ExportError, match="cannot load model"):
        export_pretrained(str(tmp_path / "no-such-model"), tmp_path / "out")

    model = tiny_llama()
    with pytest.raises(ExportError, match="dtype 'fp8': expected one of float32, bfloat16, float16"):
        export_model(model, tokenizer, tmp_path / "out", dtype="fp8")
    with pytest.raises(ExportError, match="pyramid.budget=4 is smaller than window"):
        export_model(tiny_kvforge(), tokenizer, tmp_path / "out", pyramid={"budget": 4})
    export_model(model, tokenizer, tmp_path / "out")
    with pytest.raises(ExportError, match="already exists; choose another directory or pass overwrite=True"):
        export_model(model, tokenizer, tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="is not a kvforge export .* refusing to replace it"):
        export_model(model, tokenizer, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_an_export_killed_half_way_leaves_nothing_that_loads(tmp_path, tokenizer):
    """SIGKILL while the weights are written: no DIR at all (a .DIR.tmp-* folder, which nothing loads);
    the next export removes it. Killed while replacing an older export: the older one still loads."""
    model = tiny_kvforge()
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    started = tmp_path / "weights-written"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import kvforge.models.export as export
        def stall(out_dir, model):  # the weights are on disk, nothing is verified or renamed yet
            Path({str(started)!r}).write_text("x")
            time.sleep(600)
        export.verify_weights = stall
        export.export_pretrained({str(tmp_path / "src")!r}, {str(out)!r}, overwrite=True)
    """)

    def kill_mid_export():
        started.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not started.exists():
            assert child.poll() is None and time.time() < deadline, "the export ended before it was killed"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait()

    kill_mid_export()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert not out.exists() and len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

    export_pretrained(str(tmp_path / "src"), out, dtype="float32")  # the next export cleans up
    assert not leftovers[0].exists()
    verify_export(out)
    kill_mid_export()  # now interrupt a replacement of that export
    verify_export(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_an_exception_mid_export_removes_its_temporary_folder(tmp_path, tokenizer, monkeypatch):
    import kvforge.models.export as export

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "verify_code", fail)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_kvforge(), tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real_model
@pytest.mark.parametrize("preset,arguments,surgery", [
    # 3 global layers, 27 windows of 64 + 4 sinks
    ("sliding-window", {"window": 64, "sinks": 4, "global_every": 10}, {}),
    # K/V latents at half the bytes, ranks spent greedily by calibration error (uniform ranks lose the answer)
    ("low-rank", {"budget": 0.5}, {"rank_allocation": "greedy", "budget_fraction": 0.5}),
])
def test_compressed_smollm2_exports_reloads_and_answers(smollm2_dir, tmp_path, preset, arguments, surgery):
    """SmolLM2 compressed by a spec, exported in bf16, reloaded with trust_remote_code: the cache generate()
    allocates equals the spec's arithmetic (checked at export over 160 positions) and is smaller than the
    original's, and the reloaded model still answers a question (docs/INFERENCE.md has the 2k numbers)."""
    from kvforge.trainer.calibration_rows import load_calibration_rows
    from kvforge.models.loading import document_separator_id, load_pretrained
    from kvforge.models.presets import build_preset
    from kvforge.models.surgery import compress

    torch.set_num_threads(2)
    base, tokenizer = load_pretrained(str(smollm2_dir))
    spec = build_preset(preset, base.config, **arguments)
    rows = load_calibration_rows(tokenizer, document_separator_id(tokenizer, base.config), source="stdlib-docstrings",
                                 tokens=8192, seq_len=256, show_progress=False)
    compressed = compress(base, spec, rows, settings={"show_progress": False, **surgery}).model
    result = export_model(compressed, tokenizer, tmp_path / preset, dtype="bfloat16", measure_tokens=160)
    measured = result.kv_cache["measured"]
    assert measured["bytes"] == compressed.config.kv_cache_bytes(measured["tokens"], torch.bfloat16)
    assert measured["bytes"] < 0.6 * measured["original_bytes"]
    assert result.kv_cache["original_bytes_per_token"] == 23_040

    model = AutoModelForCausalLM.from_pretrained(tmp_path / preset, trust_remote_code=True, dtype=torch.bfloat16)
    loaded_tokenizer = type(tokenizer).from_pretrained(tmp_path / preset)
    text = loaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                tokenize=False, add_generation_prompt=True)
    ids = loaded_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=loaded_tokenizer.pad_token_id)
    answer = loaded_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
