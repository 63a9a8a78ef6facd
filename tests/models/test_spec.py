"""The compression spec: every invalid layout is rejected with a message naming layer, field, value and
what is allowed; dict round trips; the spec's byte arithmetic; config and checkpoint round trips,
including loading the exported directory with plain transformers and no kvforge."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from kvforge.models.configuration_kvforge import (
    CompressionSpec,
    CompressionSpecError,
    KVForgeConfig,
    LayerSpec,
)
from kvforge.models.modeling_kvforge import KVForgeCache, KVForgeForCausalLM

# validate(num_layers, num_heads, num_kv_heads, head_dim) of the tiny test model
DIMS = (4, 4, 2, 16)
WINDOW = {"attention": "window", "window": 8, "sinks": 2}


def spec_of(*layers, **sections) -> CompressionSpec:
    return CompressionSpec.from_dict({"layers": list(layers), **sections})


def assert_rejected(data: dict, message: str, dims=DIMS):
    with pytest.raises(CompressionSpecError) as error:
        CompressionSpec.from_dict(data).validate(*dims)
    assert message in str(error.value), f"expected {message!r} in {str(error.value)!r}"


D = {}  # a dense global layer


@pytest.mark.parametrize("layers, message", [
    # ranks larger than what they compress (n_kv * head_dim = 32; joint partial latent 2 * (16 - 4) + 32 = 56)
    ([{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 33, "v_rank": 8}, D, D, D],
     "compression.layers[0].k_rank=33 is out of range: allowed 1 <= value <= 32"),
    ([D, {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 8, "v_rank": 40}, D, D],
     "compression.layers[1].v_rank=40 is out of range: allowed 1 <= value <= 32"),
    ([D, D, {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 57}, D],
     "compression.layers[2].kv_rank=57 is out of range: allowed 1 <= value <= 56"),
    ([D, D, D, {"probs_from": 0, "kv_proj": "low_rank", "v_rank": 0}],
     "compression.layers[3].v_rank=0 is out of range: allowed 1 <= value <= 32"),
    # references to itself, to later layers, and chains
    ([D, {"kv_from": 1}, D, D], "compression.layers[1].kv_from=1 must name an earlier layer: allowed 0 <= kv_from < 1"),
    ([D, {"kv_from": 3}, D, D], "compression.layers[1].kv_from=3 must name an earlier layer"),
    ([D, D, {"probs_from": 2}, D], "compression.layers[2].probs_from=2 must name an earlier layer"),
    ([{"probs_from": 1}, D, D, D], "compression.layers[0].probs_from=1 must name an earlier layer: allowed 0 <= probs_from < 0"),
    ([D, {"kv_from": -1}, D, D], "compression.layers[1].kv_from=-1 must name an earlier layer"),
    ([D, {"kv_from": 0}, {"kv_from": 1}, D],
     "compression.layers[2].kv_from=1 is invalid: layer 1 itself reads layer 0's K/V (kv_from=0); point at the producer: kv_from=0"),
    ([D, {"probs_from": 0}, {"kv_from": 1}, D],
     "compression.layers[2].kv_from=1 is invalid: layer 1 reuses layer 0's probabilities and caches no keys"),
    ([D, {"probs_from": 0}, {"probs_from": 1}, D],
     "compression.layers[2].probs_from=1 is invalid: layer 1 itself reuses layer 0's probabilities; point at the producer: probs_from=0"),
    ([D, {"kv_from": 0, "probs_from": 0}, D, D], "sets both kv_from=0 and probs_from=0"),
    # windows
    ([{"attention": "window", "window": 0}, D, D, D],
     "compression.layers[0].window=0 is out of range: allowed value >= 1"),
    ([D, {"attention": "window", "window": -4}, D, D], "compression.layers[1].window=-4 is out of range"),
    ([{"attention": "window"}, D, D, D], "compression.layers[0].window is missing"),
    ([{"window": 16}, D, D, D], "compression.layers[0].window=16 is set but attention='global'"),
    ([{"sinks": 4}, D, D, D], "compression.layers[0].sinks=4 is set but attention='global'"),
    ([{"attention": "window", "window": 8, "sinks": -1}, D, D, D], "compression.layers[0].sinks=-1 is out of range"),
    ([{"attention": "window", "window": True}, D, D, D], "compression.layers[0].window must be an integer, got True (bool)"),
    ([{"attention": "window", "window": "8"}, D, D, D], "compression.layers[0].window must be an integer, got '8' (str)"),
    # unknown names
    ([D, {"attention": "windowed", "window": 8}, D, D],
     "compression.layers[1].attention='windowed' is not one of 'global', 'window' (did you mean 'window'?)"),
    ([D, D, {"kv_proj": "lowrank"}, D], "compression.layers[2].kv_proj='lowrank' is not one of 'dense', 'low_rank', 'merged_heads' (did you mean 'low_rank'?)"),
    ([{"kv_proj": "low_rank", "rope": "pre_rope", "k_rank": 4, "v_rank": 4}, D, D, D],
     "compression.layers[0].rope='pre_rope' is not one of 'pre_rope_latent', 'partial' (did you mean 'pre_rope_latent'?)"),
    ([D, {"kv_form": 0}, D, D], "compression.layers[1]: unknown key 'kv_form' (did you mean 'kv_from'?)"),
    ([{"window_size": 8}, D, D, D], "compression.layers[0]: unknown key 'window_size' (did you mean 'window'?)"),
    # fields that do not belong to the layer's method
    ([{"k_rank": 8}, D, D, D], "compression.layers[0].k_rank=8 is not used by kv_proj='dense'; remove it"),
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 8, "k_rank": 8}, D, D, D],
     "compression.layers[0].k_rank=8 is not used by kv_proj='low_rank' with rope='partial'"),
    ([D, {"kv_from": 0, "kv_proj": "low_rank"}, D, D], "compression.layers[1].kv_proj='low_rank' has no effect: a kv_from layer"),
    ([D, {"probs_from": 0, "kv_proj": "low_rank", "v_rank": 4, "rope": "partial"}, D, D],
     "compression.layers[1].rope='partial' has no effect: a probs_from layer has no keys"),
    # low-rank and merged settings
    ([{"kv_proj": "low_rank", "k_rank": 4, "v_rank": 4}, D, D, D], "compression.layers[0].rope is missing"),
    ([{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 4}, D, D, D], "compression.layers[0].v_rank is missing"),
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 5, "kv_rank": 8}, D, D, D],
     "compression.layers[0].rope_dims=5 must be even"),
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 18, "kv_rank": 8}, D, D, D],
     "compression.layers[0].rope_dims=18 is out of range: allowed 2 <= value <= 16"),
    ([{"kv_proj": "merged_heads"}, D, D, D], "compression.layers[0].num_kv_heads is missing"),
    ([{"kv_proj": "merged_heads", "num_kv_heads": 3}, D, D, D],
     "compression.layers[0].num_kv_heads=3 is out of range: allowed 1 <= value <= 2 (merging cannot add heads"),
    # one rotary key shared by all heads (DeepSeek MLA): a joint latent of every key and value dim (2 * 32 = 64)
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 65, "rope_shared": True}, D, D, D],
     "compression.layers[0].kv_rank=65 is out of range: allowed 1 <= value <= 64 (the joint latent compresses 32 key"),
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 8, "rope_shared": "yes"}, D, D, D],
     "compression.layers[0].rope_shared='yes' must be true (one rotary key shared by every head"),
    ([{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 4, "v_rank": 4, "rope_shared": True}, D, D, D],
     "compression.layers[0].rope_shared=True is not used by kv_proj='low_rank' with rope='pre_rope_latent'"),
    ([{"rope_shared": True}, D, D, D], "compression.layers[0].rope_shared=True is not used by kv_proj='dense'"),
    ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 8, "rope_shared": True}, {"kv_from": 0},
      D, D], "compression.layers[1].kv_from=0 is invalid: layer 0 has rope_shared=true"),
    # a consumer attends over its producer's slots
    ([WINDOW, {"kv_from": 0}, D, D],
     "compression.layers[1].kv_from=0: layer 1 has attention='global' but layer 0 has attention='window', window=8, sinks=2"),
    ([WINDOW, {**WINDOW, "window": 16, "probs_from": 0}, D, D],
     "compression.layers[1].probs_from=0: layer 1 has attention='window', window=16, sinks=2 but layer 0 has attention='window', window=8, sinks=2"),
    ([WINDOW, {**WINDOW, "sinks": 0, "kv_from": 0}, D, D], "give it the same attention, window and sinks"),
    # low-bit caches
    ([{"cache_bits": 2}, D, D, D], "compression.layers[0].cache_bits=2 is not supported: allowed null (cached in the "
                                   "model's dtype) or one of 4, 8"),
    ([{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 9, "cache_bits": 4}, D, D, D],
     "compression.layers[0].cache_bits=4 packs two values per byte, so every cached dim must be even; got v_rank=9"),
    ([D, {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 21, "cache_bits": 4}, D, D],
     "compression.layers[1].cache_bits=4 packs two values per byte, so every cached dim must be even; got kv_rank=21"),
    ([{"cache_bits": True}, D, D, D], "compression.layers[0].cache_bits=True is not supported"),
    ([{"cache_bits": 8}, {"kv_from": 0, "cache_bits": 8}, D, D],
     "compression.layers[1].cache_bits=8 has no effect: a kv_from layer caches nothing"),
    # the whole model
    ([D, D, D], "compression.layers has 3 entries but the model has num_hidden_layers=4"),
])
def test_invalid_layer_specs_are_rejected_with_the_reason(layers, message):
    assert_rejected({"layers": layers}, message)


def test_merged_heads_must_divide_the_query_heads():
    # SmolLM2: 9 query heads, 3 kv heads
    assert_rejected({"layers": [{"kv_proj": "merged_heads", "num_kv_heads": 2}]},
                    "compression.layers[0].num_kv_heads=2 does not divide num_attention_heads=9; allowed: [1, 3]",
                    dims=(1, 9, 3, 64))


@pytest.mark.parametrize("data, message", [
    ({"layers": [D] * 4, "inference": {"pyramid": {"budget": 0}}}, "compression.inference.pyramid.budget=0: expected an integer >= 1"),
    ({"layers": [D] * 4, "inference": {"pyramid": {"budget": 64, "schedule": "pyramidal"}}},
     "compression.inference.pyramid.schedule='pyramidal': expected one of pyramid, uniform"),
    ({"layers": [D] * 4, "inference": {"pyramid": {"window": 8}}}, "compression.inference.pyramid.budget is missing"),
    ({"layers": [D] * 4, "inference": {"pyramids": None}}, "compression.inference: unknown key 'pyramids' (did you mean 'pyramid'?)"),
    ({"layers": [D] * 4, "calibration": {"token": 100}}, "compression.calibration: unknown key 'token' (did you mean 'tokens'?)"),
    ({"layers": [D] * 4, "calibration": {"seq_len": 0}}, "compression.calibration.seq_len=0 is out of range"),
    ({"layer": [D] * 4}, "compression: unknown key 'layer' (did you mean 'layers'?)"),
])
def test_invalid_sections_are_rejected_with_the_reason(data, message):
    assert_rejected(data, message)


def test_config_validates_its_spec():
    with pytest.raises(CompressionSpecError, match=r"compression.layers\[2\].kv_from=2 must name an earlier layer"):
        KVForgeConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      compression={"layers": [D, D, {"kv_from": 2}, D]})


COMPLEX = spec_of(
    {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20},
    {"kv_from": 0},
    {**WINDOW, "kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10},
    {**WINDOW, "probs_from": 2, "kv_proj": "low_rank", "v_rank": 8},
    calibration={"source": "stdlib-docstrings", "tokens": 4096, "seq_len": 128},
    inference={"pyramid": {"budget": 64, "schedule": "uniform", "window": 4, "pooling": "maxpool"}},
)


def test_dict_round_trip():
    COMPLEX.validate(*DIMS)
    data = COMPLEX.to_dict()
    assert CompressionSpec.from_dict(json.loads(json.dumps(data))) == COMPLEX
    assert CompressionSpec.from_dict(data).to_dict() == data
    # only what differs from a dense global layer is written
    assert data["layers"][1] == {"attention": "global", "kv_proj": "dense", "kv_from": 0}
    assert LayerSpec.from_dict(data["layers"][2]) == COMPLEX.layers[2]


def test_spec_arithmetic():
    # SmolLM2-135M uncompressed: 30 layers x 2 x 3 kv heads x 64 dims x 2 bytes
    smollm2 = CompressionSpec.dense(30)
    assert smollm2.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype=torch.bfloat16) == 23040
    assert smollm2.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16", num_tokens=100) == 23040

    per_layer = [COMPLEX.kv_cache_elements_per_token(i, num_kv_heads=2, head_dim=16) for i in range(4)]
    assert per_layer == [20 + 2 * 4, 0, 12 + 10, 8]
    # 100 tokens: the global producer holds 100 slots, window layers 8 + 2
    expected = (28 * 100 + 22 * 10 + 8 * 10) * 2 * 3  # fp16, batch 3
    assert COMPLEX.kv_cache_bytes(100, num_kv_heads=2, head_dim=16, dtype=torch.float16, batch_size=3) == expected
    # short sequences fill only part of the window
    assert COMPLEX.kv_cache_bytes(4, num_kv_heads=2, head_dim=16, dtype=torch.float32) == (28 + 22 + 8) * 4 * 4
    # long-sequence rate: window layers amortize away
    assert COMPLEX.kv_cache_bytes_per_token(num_kv_heads=2, head_dim=16, dtype=torch.float32) == 28 * 4

    shared_rope = spec_of({"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20, "rope_shared": True},
                          D, D, D)
    assert shared_rope.kv_cache_elements_per_token(0, num_kv_heads=2, head_dim=16) == 20 + 4  # the rotary key once
    assert shared_rope.to_dict()["layers"][0]["rope_shared"] is True
    assert "rope_shared" not in COMPLEX.to_dict()["layers"][0]  # only what differs from the default is written

    merged = spec_of({"kv_proj": "merged_heads", "num_kv_heads": 1}, {"probs_from": 0}, D, D)
    assert [merged.kv_cache_elements_per_token(i, num_kv_heads=2, head_dim=16) for i in range(4)] == [32, 32, 64, 64]

    # 8 bits: one byte per element and one scale in the model's dtype per cached tensor and token; a kv_from reader
    # of an 8-bit producer costs nothing, a window layer its ring
    low_bit = spec_of({"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 8},
                      {"kv_from": 0}, {**WINDOW, "cache_bits": 8}, D)
    per_slot = [low_bit.layers[i].kv_cache_bytes_per_slot(2, 16, torch.bfloat16) for i in range(4)]
    assert per_slot == [22 + 2 * 2, 0, 64 + 2 * 2, 64 * 2]
    assert low_bit.kv_cache_bytes(100, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16) == 26 * 100 + 68 * 10 + 128 * 100
    assert low_bit.kv_cache_bytes_per_token(num_kv_heads=2, head_dim=16, dtype=torch.float32) == (22 + 2 * 4) + 64 * 4
    assert low_bit.to_dict()["layers"][0]["cache_bits"] == 8 and "cache_bits" not in low_bit.to_dict()["layers"][3]

    # 4 bits: half a byte per element, the same scales
    four = spec_of({"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 4},
                   {**WINDOW, "cache_bits": 4}, D, D)
    assert [four.layers[i].kv_cache_bytes_per_slot(2, 16, torch.bfloat16) for i in range(2)] == [11 + 2 * 2, 32 + 2 * 2]
    assert [layer.rank_step for layer in four.layers] == [2, 2, 1, 1]


# ---------------------------------------------------------------------------------------------------
# Config


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256)


@pytest.mark.parametrize("base, biases", [
    (LlamaConfig(**TINY, attention_bias=True, mlp_bias=True), (True, True, True)),
    (Qwen2Config(**TINY), (True, False, False)),
    (MistralConfig(**TINY, sliding_window=None), (False, False, False)),
])
def test_from_base_config(base, biases):
    base.rope_parameters = {"rope_type": "linear", "rope_theta": 5e4, "factor": 2.0}
    config = KVForgeConfig.from_base_config(base, spec_of(D, WINDOW, D, D))
    assert (config.attention_bias, config.attention_output_bias, config.mlp_bias) == biases
    assert config.base_model_type == base.model_type
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    assert config.compression_spec.layers[1] == LayerSpec(**WINDOW)


def test_from_base_config_rejects_other_architectures():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="base model_type='gpt2' is not supported; supported: llama, mistral, qwen2"):
        KVForgeConfig.from_base_config(GPT2Config())


def test_empty_compression_means_dense():
    config = KVForgeConfig(**TINY)
    assert config.compression_spec == CompressionSpec.dense(4)
    assert config.kv_cache_bytes_per_token(torch.bfloat16) == 4 * 2 * 2 * 16 * 2


def test_config_json_round_trip(tmp_path):
    config = KVForgeConfig(**TINY, compression=COMPLEX.to_dict())
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, KVForgeConfig)
    assert loaded.compression_spec == COMPLEX
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoConfig"] == "configuration_kvforge.KVForgeConfig"


# ---------------------------------------------------------------------------------------------------
# Checkpoint round trips


def tiny_model() -> KVForgeForCausalLM:
    torch.manual_seed(0)
    spec = spec_of({"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20}, {"kv_from": 0},
                   {**WINDOW, "kv_proj": "merged_heads", "num_kv_heads": 1}, {**WINDOW, "probs_from": 2})
    config = KVForgeConfig(**TINY, compression=spec.to_dict(), initializer_range=0.1, tie_word_embeddings=True)
    model = KVForgeForCausalLM(config).eval()
    with torch.no_grad():  # a non-default rotary choice must survive the round trip
        model.model.layers[0].self_attn.rope_index.copy_(torch.tensor([[1, 5], [0, 7]]))
    return model


IDS = torch.tensor([[5, 17, 99, 3, 64, 22, 8, 41, 90, 11, 7, 2]])


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_kvforge.KVForgeConfig",
                                 "AutoModelForCausalLM": "modeling_kvforge.KVForgeForCausalLM"}
    assert (tmp_path / "modeling_kvforge.py").exists() and (tmp_path / "configuration_kvforge.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, KVForgeForCausalLM)
    assert torch.equal(loaded.model.layers[0].self_attn.rope_index, torch.tensor([[1, 5], [0, 7]]))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_exported_directory_loads_without_kvforge(tmp_path):
    """Plain transformers + trust_remote_code, with `import kvforge` made impossible in the child process."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(IDS).logits
        expected_tokens = model.generate(IDS, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.save({"ids": IDS, "logits": expected, "tokens": expected_tokens}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class NoKVForge(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "kvforge" or name.startswith("kvforge."):
                    raise ImportError("kvforge is not installed here")
        sys.meta_path.insert(0, NoKVForge())
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert not any(m == "kvforge" or m.startswith("kvforge.") for m in sys.modules)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
            out = model.generate(expected["ids"], max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        assert type(out.past_key_values).__name__ == "KVForgeCache", type(out.past_key_values)
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        assert torch.equal(out.sequences, expected["tokens"])
        print("ok", type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path), "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok transformers_modules.")


def test_pyramid_default_is_applied_by_the_cache_unless_turned_off():
    config = KVForgeConfig(**TINY, compression=spec_of(D, D, D, D, inference={"pyramid": {"budget": 16}}).to_dict())
    assert KVForgeCache(config).pyramid.settings.budget == 16
    assert KVForgeCache(config, pyramid={"budget": 24}).pyramid.settings.budget == 24
    assert KVForgeCache(config, pyramid=False).pyramid is None
