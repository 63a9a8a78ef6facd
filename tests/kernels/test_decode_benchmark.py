"""launch/benchmark_decode.py is a GPU benchmark; what can go wrong before a GPU runs it is checked here, on the CPU:
every generate() row builds a valid model of SmolLM2's geometry, the rounded-rank rows keep their bytes, the
partial-RoPE kernel rows compute, the profiler table and the max-batch search work."""

import os
import time

import pytest
from kernel_generation import tiny_model
import torch
from launch_scripts import load_launch_script

from kvforge.models.configuration_kvforge import KVForgeConfig


@pytest.fixture(scope="module")
def benchmark():
    return load_launch_script("benchmark_decode")


def smollm2_config(benchmark, spec_of):
    from transformers import LlamaConfig

    base = LlamaConfig(**benchmark.SMOLLM2)
    return KVForgeConfig.from_base_config(base, spec_of(base.num_hidden_layers))


def test_every_generate_row_is_a_valid_smollm2_model(benchmark, monkeypatch, tmp_path):
    """Each `--gen-variants` row's compression spec is valid for SmolLM2's architecture (an odd 4-bit rank or a rank
    above the width would otherwise fail on the GPU, in device time), also where the recipes' packed corpora are
    absent (a GPU machine: a fresh HOME here); the diagnostic rows of the 8-bit 25% model change only what they
    say."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/kvforge-data
    layers = {}
    for name, (_, spec_of, mode, cache) in benchmark.GENERATE_VARIANTS.items():
        assert mode in (None, "auto", "off", "triton") and cache in (None, "kvforge", "transformers"), name
        if spec_of is not None:
            config = smollm2_config(benchmark, spec_of)
            assert 0 < config.kv_cache_bytes(4096, dtype=torch.bfloat16) <= 2 * 30 * 3 * 64 * 2 * 4096, name
            layers[name] = config.compression["layers"]
    int8, bf16, aligned = layers["lr25-int8-static"], layers["lr25-bf16-static"], layers["lr25-int8-aligned-static"]
    assert all(layer["cache_bits"] == 8 for layer in int8) and not any("cache_bits" in layer for layer in bf16)
    assert [layer["k_rank"] for layer in bf16] == [layer["k_rank"] for layer in int8]
    assert any(layer["k_rank"] % 16 for layer in int8)
    assert all(layer["k_rank"] % 16 == layer["v_rank"] % 16 == 0 for layer in aligned)
    # the 8-bit partial-RoPE recipe's preset rank (92) on 16-byte rows, as its surgery leaves them
    assert {(layer["kv_rank"], layer["rope_dims"], layer["cache_bits"])
            for layer in layers["partial-rope-25-int8-static"]} == {(96, 32, 8)}


@pytest.mark.parametrize("rounded, greedy, multiple, bits", [
    ("lr25_int8_aligned_spec", "lr25_int8_spec", 16, 8), ("lr12_int4_aligned_spec", "lr12_int4_spec", 32, 4)])
def test_rounded_rank_rows_put_cache_rows_on_16_bytes_at_about_the_same_bytes(benchmark, rounded, greedy, multiple,
                                                                               bits):
    aligned, original = (smollm2_config(benchmark, getattr(benchmark, f)) for f in (rounded, greedy))
    for layer in aligned.compression_spec.layers:
        assert all(rank % multiple == 0 and rank * bits // 8 % 16 == 0 for rank in (layer.k_rank, layer.v_rank))
    a, o = (c.kv_cache_bytes(4096, dtype=torch.bfloat16) for c in (aligned, original))
    assert abs(a / o - 1) < 0.05


def test_l2_cold_cases_copy_the_tensors_until_they_outgrow_l2(benchmark):
    """Copies of a case's tensors (distinct memory, the same values) until their bytes reach 8 L2 caches; modules
    and other values shared; none where one case alone is that large."""
    linear = torch.nn.Linear(2, 2)
    case = dict(cache=torch.arange(1000, dtype=torch.float32), mask=torch.ones(1000, dtype=torch.bool), up=linear,
                scaling=0.5)  # 5,000 bytes
    cases = benchmark.l2_cold_cases(case, l2_bytes=2_000)  # 8 x 2,000 bytes: 4 cases
    assert len(cases) == 4 and cases[0] is case
    for copy in cases[1:]:
        assert torch.equal(copy["cache"], case["cache"]) and copy["cache"].data_ptr() != case["cache"].data_ptr()
        assert torch.equal(copy["mask"], case["mask"]) and copy["up"] is linear and copy["scaling"] == 0.5
    assert benchmark.l2_cold_cases(case, l2_bytes=600) == [case]


def cpu_timings(fn, case):
    start = time.perf_counter()
    fn(case)
    return (time.perf_counter() - start) * 1e3, (time.perf_counter() - start) * 1e3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel runs tensors on CPU through Triton's interpreter")
@pytest.mark.parametrize("bits, per_slot", [(8, 16 + 32 + 4), (4, (16 + 32) // 2 + 4)])
def test_the_latent_kernel_rows_compute_on_cpu_for_low_bit_latents_and_each_program_split(benchmark, bits,
                                                                                          per_slot):
    """The latent kernel part with a CPU timer, float16, tiny shapes, int8 / packed 4-bit latents and a sweep of
    launch settings (one column per combination): its error check covers every kernel column, its bytes count what
    a low-bit cache stores, before a GPU ever runs it."""
    args = benchmark.parse_args(["--part", "kernel", "--batch", "2", "--context", "40", "--k-rank", "16",
                                 "--v-rank", "32", "--cache-bits", str(bits), "--kv-per-program", "0", "1",
                                 "--split-columns", "0", "1", "--slot-rows", "0", "1"])
    rows, error = benchmark.run_kernel_part(args, 1e12, device="cpu", timings=cpu_timings, dtype=torch.float16)
    assert error < 5e-3
    (row,) = rows
    assert row["latent_bytes"] == 2 * 40 * (per_slot + 8 + 1) and row["cache_bits"] == bits
    # 0 is the kernel's own choice for a count (no tag), off for a layout choice (_sc0)
    columns = [f"{kv}{sc}{sr}" for kv in ("", "_kv1") for sc in ("_sc0", "_sc1") for sr in ("_sr0", "_sr1")]
    assert all(row[f"triton_graph_TBps{suffix}"] > 0 for suffix in columns)
    assert row["triton_best"] in {f"triton_latent{suffix}" for suffix in columns}


def test_an_exported_copy_is_the_bundled_code_and_decodes_as_the_model_did(benchmark, tmp_path, monkeypatch):
    """--via-export times what a user loads: the exporter's directory through plain transformers with
    trust_remote_code (the bundled modeling file, not kvforge's), decoding the same tokens with the static cache."""
    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layer = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 8}
    model = tiny_model([layer, layer])
    copy = benchmark.exported_copy(model, tmp_path / "lr")
    assert type(copy).__module__.startswith("transformers_modules") and type(copy) is not KVForgeForCausalLM
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    runs = [m.generate(ids, attention_mask=torch.ones_like(ids), cache=m.static_cache(7 + 4, cuda_graphs=False),
                       max_new_tokens=4, do_sample=False, pad_token_id=0) for m in (model, copy)]
    assert torch.equal(runs[0], runs[1])


def test_latent_kernel_launch_settings_are_checked(benchmark):
    assert benchmark.launch_settings(["kv_per_program=1", "programs_per_sm=8"]) == dict(
        kv_per_program=1, programs_per_sm=8)
    with pytest.raises(SystemExit, match="'kv_per_progam=1': expected KEY=N with KEY one of"):
        benchmark.launch_settings(["kv_per_progam=1"])
    from kvforge.kernels import partial_rope_decode

    assert benchmark.launch_settings(["slot_rows=1"], "--partial-kernel", partial_rope_decode.LAUNCH_DEFAULTS) == dict(
        slot_rows=1)
    with pytest.raises(SystemExit, match=r"--partial-kernel 'prefetch=1': expected KEY=N with KEY one of "
                                         r"\['fused_values', 'half_products', 'int8_scores', 'max_registers', "
                                         r"'prefetch_scales', "
                                         r"'prefetch_slots', 'programs_per_sm', 'slot_rows', 'split_columns', "
                                         r"'whole_waves'\]"):
        benchmark.launch_settings(["prefetch=1"], "--partial-kernel", partial_rope_decode.LAUNCH_DEFAULTS)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel runs tensors on CPU through Triton's interpreter")
@pytest.mark.parametrize("cache_bits, sweep, columns, slot_bytes", [
    (16, ["--block-s", "0", "16"], ["triton_partial_sr0", "triton_partial_sr1", "triton_partial_bs16_sr0",
                                    "triton_partial_bs16_sr1"], (24 + 3 * 8) * 2 + 1),
    (8, [], ["triton_partial_sr0", "triton_partial_sr1"], 24 + 3 * 8 + 2 * 2 + 1),  # int8 values, 2 bf16 scales
])
def test_the_partial_rope_kernel_rows_compute_on_cpu(benchmark, cache_bits, sweep, columns, slot_bytes):
    """The partial-RoPE part with a CPU timer, float16, tiny shapes: its cases, byte counts and error check are
    right before a GPU ever runs them; an 8-bit cache's rows hand the kernel int8 values with their scales."""
    args = benchmark.parse_args(["--part", "partial", "--batch", "2", "--context", "40", "--kv-rank", "24",
                                 "--rope-dims", "8", "--slot-rows", "0", "1", "--cache-bits", str(cache_bits), *sweep])
    rows, error = benchmark.run_partial_rope_kernel_part(args, 1e12, device="cpu", timings=cpu_timings,
                                                         dtype=torch.float16)
    assert error < 5e-3
    assert [row["rope_heads"] for row in rows] == [3, 1]
    assert rows[0]["cache_bytes"] == 2 * 40 * slot_bytes
    assert all(row[f"{column}_graph_GBps"] > 0 for row in rows for column in columns)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel runs tensors on CPU through Triton's interpreter")
def test_the_gqa_kernel_rows_compute_on_cpu(benchmark):
    """The gqa part with a CPU timer, float16, tiny shapes: SDPA, kvforge's PyTorch path and the kernel over the
    bf16 cache and the 8-bit one (or the 4-bit one), each with its bytes and its error against float64, before a
    GPU runs them."""
    args = benchmark.parse_args(["--part", "gqa", "--batch", "2", "--context", "40", "--half-products", "1",
                                 "--block-s", "0", "16", "--programs-per-sm", "0", "2", "--int8-scores", "0", "1"])
    rows, error = benchmark.run_gqa_kernel_part(args, 1e12, device="cpu", timings=cpu_timings, dtype=torch.float16)
    assert error < 1e-2  # the int8 scores' query rounding (~0.5%); the other columns are within 5e-3
    assert (rows[0]["bf16_bytes"], rows[0]["int8_bytes"]) == (2 * 40 * (768 + 1), 2 * 40 * (384 + 4 + 1))
    assert all(rows[0][f"{name}_of_copy"] > 0 for name in (
        "sdpa_full", "torch_kv_bf16", "torch_kv_int8", "triton_gqa_bf16", "triton_gqa_bf16_pps2_bs16",
        "triton_gqa_int8_hp1_is0", "triton_gqa_int8_bs16_hp1_is1", "triton_gqa_int8_pps2_bs16_hp1_is1"))
    # half products and int8 scores: the 8-bit cache's only
    assert not any("bf16" in name and ("_hp" in name or "_is" in name) for name in rows[0])
    args = benchmark.parse_args(["--part", "gqa", "--batch", "2", "--context", "40", "--cache-bits", "4"])
    rows, error = benchmark.run_gqa_kernel_part(args, 1e12, device="cpu", timings=cpu_timings, dtype=torch.float16)
    assert error < 5e-3 and rows[0]["int4_bytes"] == 2 * 40 * (192 + 4 + 1)
    assert rows[0]["triton_gqa_int4_of_copy"] > 0 and rows[0]["torch_kv_int4_of_copy"] > 0


def test_the_profiler_table_of_a_generate_call(benchmark):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    table = benchmark.profiled_generate(model, torch.randint(3, 64, (2, 5)), 4, None, rows=500)
    assert "aten::" in table and "Self CPU" in table
    assert table.startswith("decode steps profiled: 3; wall ")
    # The prefill is left out: one attention call per layer and decode step (2 x 3), none for the prompt.
    attention = next(line for line in table.splitlines() if line.strip().startswith("aten::scaled_dot_product_att"))
    assert attention.split()[-1] == "6"


@pytest.mark.parametrize("largest, limit", [(77, 4096), (1, 4096), (0, 4096), (5000, 4096), (8, 4096), (300, 300),
                                            (1000, 4096), (3, 4096)])
def test_the_decode_benchmark_finds_the_largest_batch_that_fits(benchmark, largest, limit):
    """`--part max-batch` (issue 12: the largest batch at 32k context) searches batches by running generate() and
    catching out-of-memory: doubling, then bisection to within 1/32 below the true largest, never above it, in few
    tries (each is a full generate() on the GPU)."""
    found, tried = benchmark.largest_batch(lambda batch: batch <= largest, limit=limit)
    expected = min(largest, limit)
    assert found <= expected and found >= expected - max(1, expected // 32)
    assert all(fitted == (batch <= largest) for batch, fitted in tried) and len(tried) <= 20


@pytest.mark.parametrize("cache", [None, "kvforge"])
def test_a_prompt_prefilled_in_chunks_decodes_the_same_tokens(benchmark, cache):
    """--prefill-chunk (the max-batch rows at 32k: the prefill's activations would otherwise bound the batch before
    the cache does) hands generate() prefill_chunk_size; kvforge's caches, dynamic and static, take the prompt in
    chunks and decode what one pass decodes, for every kind of layer at once."""
    layers = [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 8},
              {"attention": "window", "window": 8, "sinks": 2}, {}]
    model = tiny_model(layers)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    widths = []  # tokens per forward of the decoder
    model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    _, whole = benchmark.timed_generate(model, ids, 5, 1, cache)
    assert widths == [21, 1, 1, 1, 1]
    widths.clear()
    _, chunked = benchmark.timed_generate(model, ids, 5, 1, cache, prefill_chunk=8)
    assert widths == [8, 8, 5, 1, 1, 1, 1]
    assert torch.equal(whole.sequences, chunked.sequences)


def test_the_gpu_session_script_asks_only_for_rows_the_benchmark_takes(benchmark):
    """x2-session.sh's default decode rows (DECODE_ARGS, DECODE_ARGS0: "|"-separated argument sets) parse as
    benchmark_decode's arguments, their variants exist and their kernel settings are known: a typo would otherwise
    surface only on the GPU, after the session's minutes are spent."""
    import re
    import shlex
    from pathlib import Path

    from kvforge.kernels import partial_rope_decode

    script = (Path(__file__).resolve().parents[2] / "docs/results/multigpu-h200/x2-session.sh").read_text()
    for name in ("DECODE_ARGS", "DECODE_ARGS0"):
        found = re.search(rf'^{name}=\$\{{{name}-"(.*?)"\}}', script, re.S | re.M)
        assert found, f"{name} has no default in x2-session.sh"
        for argument_set in found[1].replace("\\\n", "").split("|"):
            args = benchmark.parse_args(["--part", "generate"] + shlex.split(argument_set))
            benchmark.launch_settings(args.latent_kernel)
            benchmark.launch_settings(args.partial_kernel, "--partial-kernel", partial_rope_decode.LAUNCH_DEFAULTS)
            assert args.part in ("generate", "kernel", "latent", "partial", "gqa", "max-batch")
    variants = re.search(r'^MAX_BATCH_VARIANTS=\$\{MAX_BATCH_VARIANTS-(.*?)\}', script, re.M)[1].split()
    assert set(variants) <= set(benchmark.GENERATE_VARIANTS)


def test_a_kept_static_cache_is_reset_reused_and_checked(benchmark, monkeypatch):
    """The generate rows keep one static cache per length across calls (reset() between them, as transformers keeps
    its StaticCache): each later call replays what the first captured, and must give the first call's tokens."""
    model = tiny_model([{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10,
                         "cache_bits": 8}, {"attention": "window", "window": 8, "sinks": 2}])
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    made = []
    static_cache = model.static_cache
    monkeypatch.setattr(model, "static_cache", lambda *args, **kwargs: made.append(static_cache(*args, **kwargs))
                        or made[-1])
    kept = {}
    _, out = benchmark.timed_generate(model, ids, 5, 3, "kvforge", kept=kept)
    assert len(made) == 1 and kept == {26: made[0]}
    _, fresh = benchmark.timed_generate(model, ids, 5, 1, "kvforge")
    assert torch.equal(out.sequences, fresh.sequences)
    generate = model.generate
    calls = []

    def drifting(*args, **kwargs):  # a second call that decodes something else
        result = generate(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            result.sequences[0, -1] += 1
        return result

    monkeypatch.setattr(model, "generate", drifting)
    with pytest.raises(RuntimeError, match="kept and reset kvforge cache gave other tokens"):
        benchmark.timed_generate(model, ids, 5, 2, "kvforge", kept=kept)
