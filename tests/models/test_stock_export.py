"""--format auto|kvforge|stock: compressed layouts with an exact stock transformers architecture are exported as
that class (models/stock.py) and load with plain `AutoModelForCausalLM.from_pretrained(dir)`, no remote code.

Each mapping: a tiny KVForge model built from a preset -> launch/export.py --format stock -> loaded without
trust_remote_code: the same logits (fp32, atol 1e-4) on a left-padded batch, the same greedy tokens with the
stock class's own cache, that cache's bytes against the kvforge spec. Layouts without a stock equivalent are
refused naming the layer and field, and written as the kvforge class under --format auto.
"""

import json
from pathlib import Path

import pytest
import torch
from launch_scripts import load_launch_script
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import sliding_window_overlay

from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.modeling_kvforge import KVForgeForCausalLM, visibility_mask
from kvforge.models.presets import build_preset
from kvforge.models.stock import expected_stock_bytes, left_padded_batch, plan, stock_cache_bytes, to_stock

VOCAB = 49152  # the real tokenizer's (saved with the source model, as a user's directory would be)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=True)
WINDOW = 8
TOL = 1e-4
SHARED_ROPE = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 12, "rope_shared": True}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from kvforge.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def base_config(kind: str):
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**TINY, pad_token_id=0)


def compressed(kind: str, preset: str, seed: int = 0, **arguments) -> KVForgeForCausalLM:
    """A random tiny KVForge model with a preset's layout on a Llama (no biases) or Qwen2 (q/k/v biases) base;
    biases drawn non-zero so that a mapping that drops or zeroes one shows."""
    base = base_config(kind)
    spec = build_preset(preset, base, **arguments)
    return custom(KVForgeConfig.from_base_config(base, spec), seed)


def custom(config: KVForgeConfig, seed: int = 0) -> KVForgeForCausalLM:
    torch.manual_seed(seed)
    model = KVForgeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def layers_config(layers, **overrides) -> KVForgeConfig:
    fields = {**TINY, "num_hidden_layers": len(layers), "pad_token_id": 0, **overrides}
    return KVForgeConfig(**fields, compression={"layers": layers})


def export_cli(argv, capsys):
    """launch/export.py main() in this process: (exit code, parsed stdout or None, stderr)."""
    code = load_launch_script("export").main([str(a) for a in argv])
    out, err = capsys.readouterr()
    # The JSON summary is the last thing printed (a library may log a line before it).
    return code, (json.loads(out[out.rindex("\n{\n") + 1 if "\n{\n" in out else 0:]) if code == 0 else None), err


def save_source(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def left_padded(lengths, seed=1):
    return left_padded_batch(VOCAB, lengths, pad=0, seed=seed)


def assert_same_computation(kvforge_model, stock_model, window=None):
    """Logits (fp32, atol 1e-4) on a left-padded batch longer than the window, and greedy generate() with each
    model's own cache from prompts ending before the window's edge, through it."""
    ids, mask = left_padded((3 * WINDOW + 5, 2 * WINDOW))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = kvforge_model(ids, attention_mask=mask, position_ids=positions).logits
        actual = stock_model(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    diff = (expected[real] - actual[real]).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"
    prompt, prompt_mask = left_padded((WINDOW - 2, WINDOW - 5), seed=2)
    tokens = []
    for m in (kvforge_model, stock_model):
        out = m.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=2 * WINDOW,
                         min_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
        tokens.append(out[:, prompt.shape[1]:])
    assert torch.equal(tokens[0], tokens[1]), (tokens[0].tolist(), tokens[1].tolist())


# ---------------------------------------------------------------------------------------------------
# Window semantics: kvforge's window W and transformers' sliding_window (the off-by-one to get right)


def test_window_definitions_agree_mask_by_mask():
    """kvforge: a token sees itself and the W - 1 tokens before it (q - k < W). transformers 5.x's overlay:
    kv_idx > q_idx - sliding_window. The same set for sliding_window = W, not W - 1 or W + 1."""
    n = 3 * WINDOW
    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    ours = visibility_mask(q, k, WINDOW, 0)
    overlay = sliding_window_overlay(WINDOW)
    theirs = torch.tensor([[bool(overlay(0, 0, i, j)) and j <= i for j in range(n)] for i in range(n)])
    assert torch.equal(ours.reshape(n, n), theirs)
    assert int(ours.reshape(n, n)[-1].sum()) == WINDOW  # the token itself + W - 1 before it


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_only_sliding_window_equal_to_the_kvforge_window_gives_the_same_model(offset):
    model = compressed("qwen2", "sliding-window", window=WINDOW, global_every=2)
    mapping, refusal = plan(model.config)
    assert mapping.name == "qwen2-sliding" and refusal is None
    stock = to_stock(model, mapping)
    assert stock.config.sliding_window == WINDOW
    if offset == 0:
        assert_same_computation(model, stock)
        return
    stock.config.sliding_window = WINDOW + offset  # the mask reads it per forward; the layers keep theirs
    for layer in stock.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = WINDOW + offset
    ids, mask = left_padded((3 * WINDOW,))
    with torch.no_grad():
        diff = (model(ids, attention_mask=mask).logits - stock(ids, attention_mask=mask).logits).abs().max().item()
    assert diff > 1e-2, f"sliding_window={WINDOW + offset} should not reproduce kvforge window {WINDOW}"


# ---------------------------------------------------------------------------------------------------
# The mappings, through the CLI, loaded without remote code

CASES = {
    # name: (base, preset, arguments, stock class, sliding layers)
    "standard-llama": ("llama", "standard", {}, LlamaForCausalLM, 0),
    "standard-qwen2-biases": ("qwen2", "standard", {}, LlamaForCausalLM, 0),
    "merged-heads-llama": ("llama", "merged-heads", {"num_kv_heads": 1}, LlamaForCausalLM, 0),
    "merged-heads-qwen2-biases": ("qwen2", "merged-heads", {"num_kv_heads": 1}, LlamaForCausalLM, 0),
    "sliding-global-llama": ("llama", "sliding-window", {"window": WINDOW, "global_every": 2}, Qwen2ForCausalLM, 2),
    "sliding-global-qwen2": ("qwen2", "sliding-window", {"window": WINDOW, "global_every": 2}, Qwen2ForCausalLM, 2),
    "sliding-every-layer": ("llama", "sliding-window", {"window": WINDOW}, Qwen2ForCausalLM, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_stock_export_loads_without_remote_code_and_computes_the_same(case, tmp_path, tokenizer, capsys):
    kind, preset, arguments, cls, sliding = CASES[case]
    model = compressed(kind, preset, **arguments)
    source = save_source(model, tokenizer, tmp_path / "src")
    out = tmp_path / "out"
    code, printed, err = export_cli(["--model", source, "--out", out, "--format", "stock", "--dtype", "float32"],
                                    capsys)
    assert code == 0, err
    assert printed["kvforge"] is False and printed["architecture"] == cls.__name__
    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "compression" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(loaded) is cls
    heads = {layer.num_kv_heads for layer in model.config.compression_spec.layers if layer.num_kv_heads}
    assert loaded.config.num_key_value_heads == (heads.pop() if heads else model.config.num_key_value_heads)
    if cls is Qwen2ForCausalLM:
        assert loaded.config.sliding_window == WINDOW
        assert loaded.config.layer_types.count("sliding_attention") == sliding
        assert loaded.config.max_window_layers == loaded.config.layer_types.index("sliding_attention")
    assert_same_computation(model, loaded)

    # The stock class's own cache, measured, against the kvforge spec: global layers hold what kvforge's hold;
    # a sliding layer holds W - 1 tokens where kvforge's ring holds W.
    tokens = 3 * WINDOW
    measured = stock_cache_bytes(loaded, tokens)
    assert measured["tokens"] == tokens
    spec = model.config.kv_cache_bytes(tokens, torch.float32)
    per_slot = 2 * loaded.config.num_key_value_heads * 16 * 4
    assert measured["total_bytes"] == expected_stock_bytes(model.config, tokens, torch.float32)
    assert measured["total_bytes"] == spec - sliding * per_slot
    manifest = json.loads((out / "kvforge_export.json").read_text())
    assert manifest["kvforge"] is False and manifest["stock"]["architecture"] == cls.__name__
    assert manifest["stock"]["check"]["same_tokens"] and manifest["stock"]["check"]["max_logit_diff"] <= TOL
    assert manifest["kv_cache"]["bytes_per_token"] == model.config.kv_cache_bytes_per_token(torch.float32)
    assert manifest["kv_cache"]["measured"]["total_bytes"] == expected_stock_bytes(
        model.config, manifest["kv_cache"]["measured"]["tokens"], torch.float32)
    assert f"stock `{cls.__name__}`" in (out / "README.md").read_text()


def test_auto_picks_the_stock_class_and_kvforge_keeps_todays_export(tmp_path, tokenizer, capsys):
    model = compressed("llama", "sliding-window", window=WINDOW, global_every=2)
    source = save_source(model, tokenizer, tmp_path / "src")
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "auto", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert printed["architecture"] == "Qwen2ForCausalLM"
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "kv", "--dtype", "float32",
                                     "--format", "kvforge"], capsys)
    assert code == 0, err
    assert printed["kvforge"] is True
    config = json.loads((tmp_path / "kv" / "config.json").read_text())
    assert config["model_type"] == "kvforge" and "auto_map" in config
    assert "stock" not in json.loads((tmp_path / "kv" / "kvforge_export.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Layouts without a stock equivalent: refused by --format stock (layer and field), kvforge under auto

REFUSED = {
    "sinks": ([{"attention": "window", "window": WINDOW, "sinks": 2}, {}], {}, "compression.layers[0].sinks=2"),
    "kv_from": ([{}, {}, {"kv_from": 1}], {}, "compression.layers[2].kv_from=1"),
    "probs_from": ([{}, {"probs_from": 0}], {}, "compression.layers[1].probs_from=0"),
    "low_rank": ([{}, {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 8, "v_rank": 8}], {},
                 "compression.layers[1].kv_proj='low_rank'"),
    "partial_rope": ([{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 16}], {},
                     "compression.layers[0].kv_proj='low_rank'"),
    # DeepSeek MLA: one kv_lora_rank, no q bias
    "shared_rope_ranks_per_layer": ([{**SHARED_ROPE, "kv_rank": 20}, SHARED_ROPE], {},
                                    "compression.layers[1].kv_rank=12"),
    # (a model-level refusal names no layer, so the furthest refusal reported is Llama's, at layer 0)
    "shared_rope_q_bias": ([SHARED_ROPE], {"attention_bias": True}, "compression.layers[0].kv_proj='low_rank'"),
    "int8_cache": ([{}, {"cache_bits": 8}], {}, "compression.layers[1].cache_bits=8"),
    "int8_shared_rope": ([{**SHARED_ROPE, "cache_bits": 8}], {}, "compression.layers[0].cache_bits=8"),
    "heads_per_layer": ([{"kv_proj": "merged_heads", "num_kv_heads": 1}, {}], {},
                        "compression.layers[1].kv_proj='dense'"),
    "windows_per_layer": ([{"attention": "window", "window": WINDOW}, {"attention": "window", "window": 6}], {},
                          "compression.layers[1].window=6"),
    "o_bias_with_window": ([{}, {"attention": "window", "window": WINDOW}], {"attention_output_bias": True},
                           "compression.layers[1].attention='window'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_layout_without_stock_equivalent_is_refused_naming_layer_and_field(case, tmp_path, tokenizer, capsys):
    """--format stock: exit 2, one line naming the layer and field; --format auto: the kvforge class."""
    layers, overrides, where = REFUSED[case]
    model = custom(layers_config(layers, **overrides))
    mapping, refusal = plan(model.config)
    assert mapping is None
    assert refusal.message().startswith(where), refusal.message()
    source = save_source(model, tokenizer, tmp_path / "src")
    code, _, err = export_cli(["--model", source, "--out", tmp_path / "stock", "--format", "stock"], capsys)
    assert code == 2 and not (tmp_path / "stock").exists()
    errors = [line for line in err.splitlines() if "error" in line]  # progress bars share stderr
    assert errors == [f"export error: {refusal.message()}"], err
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "auto", "--measure-tokens", "0"], capsys)
    assert code == 0 and printed["architecture"] == "KVForgeForCausalLM", err


def test_refused_by_stock_and_written_as_kvforge_under_auto(tmp_path, tokenizer, capsys):
    layers = [{"attention": "window", "window": WINDOW, "sinks": 2}, {}, {}, {"kv_from": 2}]
    model = custom(layers_config(layers))
    source = save_source(model, tokenizer, tmp_path / "src")
    code, _, err = export_cli(["--model", source, "--out", tmp_path / "stock", "--format", "stock"], capsys)
    assert code == 2 and not (tmp_path / "stock").exists()
    errors = [line for line in err.splitlines() if "error" in line]  # progress bars share stderr
    assert len(errors) == 1 and errors[0].startswith("export error: compression.layers[0].sinks=2 "), err
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "auto", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert printed["kvforge"] is True and printed["architecture"] == "KVForgeForCausalLM"
    manifest = json.loads((tmp_path / "auto" / "kvforge_export.json").read_text())
    assert manifest["stock"] == {"format": "kvforge", "reason": plan(model.config)[1].message()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", trust_remote_code=True).eval()
    ids, mask = left_padded((20,))
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_a_pyramid_default_needs_the_kvforge_class(tmp_path, tokenizer, capsys):
    model = compressed("llama", "merged-heads", num_kv_heads=1)
    source = save_source(model, tokenizer, tmp_path / "src")
    code, _, err = export_cli(["--model", source, "--out", tmp_path / "s", "--format", "stock",
                               "--pyramid-budget", "16"], capsys)
    assert code == 2 and "PyramidKV" in err
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "a", "--dtype", "float32",
                                     "--pyramid-budget", "16"], capsys)
    assert code == 0 and printed["kvforge"] is True, err


def test_a_head_dim_other_than_hidden_over_heads_survives_the_stock_config(tmp_path):
    """Qwen2Config has no head_dim field of its own: the export must still carry it (24 here, not 64 / 4)."""
    config = layers_config([{"attention": "window", "window": WINDOW}, {}], head_dim=24)
    model = custom(config)
    mapping, _ = plan(model.config)
    to_stock(model, mapping).save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is Qwen2ForCausalLM and loaded.config.head_dim == 24
    assert_same_computation(model, loaded)


@pytest.mark.parametrize("breakage", ["config", "weights"])
def test_a_conversion_that_fails_its_check_is_not_written_as_stock(breakage, tmp_path, monkeypatch):
    """A mapping that computes something else (here: a wrong rms_norm_eps) or whose renames miss a weight: stock
    refuses with the reason, auto writes the kvforge class and records why."""
    import dataclasses

    from kvforge.models import stock
    from kvforge.models.export import ExportError, export_model

    index = next(i for i, m in enumerate(stock.MAPPINGS) if m.name == "llama")
    llama = stock.MAPPINGS[index]
    if breakage == "config":
        broken = dataclasses.replace(llama, fields=lambda c, u: {**llama.fields(c, u), "rms_norm_eps": 0.3})
        reason = "logits"
    else:
        broken = dataclasses.replace(llama, renames=((r"\.q_proj\.", ".query."),))
        reason = "does not fit this model's weights"
    monkeypatch.setattr(stock, "MAPPINGS", (*stock.MAPPINGS[:index], broken, *stock.MAPPINGS[index + 1:]))
    with pytest.raises(ExportError, match=reason):
        export_model(compressed("llama", "standard"), None, tmp_path / "stock", dtype="float32", format="stock")
    assert not (tmp_path / "stock").exists()
    result = export_model(compressed("llama", "standard"), None, tmp_path / "auto", dtype="float32", format="auto")
    assert result.kvforge
    manifest = json.loads((tmp_path / "auto" / "kvforge_export.json").read_text())
    assert manifest["stock"]["format"] == "kvforge" and reason in manifest["stock"]["reason"]


# ---------------------------------------------------------------------------------------------------
# Shared rotary key (DeepSeek MLA) -> DeepseekV3ForCausalLM


@pytest.mark.parametrize("format", ["stock", "auto"])
def test_shared_rotary_layout_exports_as_deepseek_v3(format, tmp_path, tokenizer, capsys):
    """Through the CLI, loaded without remote code: the same logits (fp32, atol 1e-4) and greedy tokens with
    DeepSeek's own cache, which holds the latent (plus the constant carrier dim) and the one rotary key."""
    from transformers import DeepseekV3ForCausalLM

    model = custom(layers_config([SHARED_ROPE] * 3, attention_output_bias=True))  # an o_proj bias takes v_up's mean
    source = save_source(model, tokenizer, tmp_path / "src")
    out = tmp_path / "out"
    code, printed, err = export_cli(["--model", source, "--out", out, "--format", format, "--dtype", "float32"],
                                    capsys)
    assert code == 0, err
    assert printed["kvforge"] is False and printed["architecture"] == "DeepseekV3ForCausalLM"
    assert not list(out.glob("*.py"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(loaded) is DeepseekV3ForCausalLM
    c = loaded.config
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim, c.q_lora_rank) == (13, 4, 16, 16, None)
    assert c.first_k_dense_replace == 3 and not c.rope_interleave
    assert_same_computation(model, loaded)
    # transformers 5.x's DeepSeek cache stores the latent [B, 1, S, kv_lora_rank] and the rotated shared key
    # [B, 1, S, Dr], never decompressed K/V: (12 + 1 + 4) elements per token per layer against the spec's 12 + 4.
    tokens = 3 * WINDOW
    measured = stock_cache_bytes(loaded, tokens)
    assert measured["total_bytes"] == 3 * tokens * (12 + 1 + 4) * 4
    assert model.config.kv_cache_bytes(tokens, torch.float32) == 3 * tokens * (12 + 4) * 4
    manifest = json.loads((out / "kvforge_export.json").read_text())
    assert manifest["stock"]["check"]["max_logit_diff"] <= TOL and manifest["stock"]["check"]["same_tokens"]


def test_deepseek_needs_rotary_pairs_its_rope_can_express(tmp_path, tokenizer, capsys):
    """Kept pairs 0, s, 2s, ... map to a rope_theta; others (the "norm" criterion's pick) are refused by --format
    stock naming the layer, and written as the kvforge class by auto."""
    from transformers import DeepseekV3ForCausalLM

    model = custom(layers_config([SHARED_ROPE] * 2))
    with torch.no_grad():
        model.model.layers[0].self_attn.rope_index.copy_(torch.tensor([[0, 4]]))  # stride 4 in both layers
        model.model.layers[1].self_attn.rope_index.copy_(torch.tensor([[0, 4]]))
    mapping, _ = plan(model.config)
    stock = to_stock(model, mapping)
    assert type(stock) is DeepseekV3ForCausalLM
    assert stock.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 ** (4 * 4 / 16))
    assert_same_computation(model, stock)
    with torch.no_grad():
        model.model.layers[1].self_attn.rope_index.copy_(torch.tensor([[1, 3]]))
    source = save_source(model, tokenizer, tmp_path / "src")
    code, _, err = export_cli(["--model", source, "--out", tmp_path / "stock", "--format", "stock"], capsys)
    assert code == 2 and "compression.layers[1] keeps rotary pairs [1, 3]" in err, err
    code, printed, err = export_cli(["--model", source, "--out", tmp_path / "auto", "--dtype", "float32"], capsys)
    assert code == 0 and printed["architecture"] == "KVForgeForCausalLM", err


def test_launch_evaluate_scores_the_deepseek_export_as_the_kvforge_export(tmp_path, tokenizer, capsys):
    """launch/evaluate.py loaded only kvforge's base architectures, so the DeepSeek-V3 export of SmolLM2's MLA recipe
    could not be scored by it ("model_type 'deepseek_v3', which kvforge does not support"). Both exports of one model
    now give the same held-out perplexity; the suite (its KV fraction reads the original's geometry from the config)
    and the surgery's loader still refuse the stock class, naming it."""
    from kvforge.models.loading import ModelLoadError, load_pretrained

    model = custom(layers_config([SHARED_ROPE] * 2))
    source = save_source(model, tokenizer, tmp_path / "src")
    for format in ("stock", "kvforge"):
        code, _, err = export_cli(["--model", source, "--out", tmp_path / format, "--format", format,
                                   "--dtype", "float32"], capsys)
        assert code == 0, err
    text = tmp_path / "text"
    text.mkdir()
    for i in range(8):
        (text / f"doc{i}.txt").write_text(f"Document {i}: " + " ".join(f"word{j * i % 17}" for j in range(60)))
    evaluate = load_launch_script("evaluate")
    perplexity = {}
    for format in ("stock", "kvforge"):
        out = tmp_path / f"{format}.json"
        code = evaluate.main(["--model", str(tmp_path / format), "--data", str(text), "--seq-len", "32",
                              "--eval-fraction", "0.5", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                              "--json", str(out)])
        assert code == 0, capsys.readouterr().err
        perplexity[format] = json.loads(out.read_text())["perplexity"]
    assert perplexity["stock"] == pytest.approx(perplexity["kvforge"], rel=1e-5)
    code = evaluate.main(["--model", str(tmp_path / "stock"), "--task", "suite", "--device", "cpu"])
    assert code == 2 and "model_type 'deepseek_v3', a stock export" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="does not compress or train it"):
        load_pretrained(str(tmp_path / "stock"))
