"""launch/benchmark_decode.py is a GPU benchmark; what can go wrong before a GPU runs it is checked here, on the CPU:
every generate() row builds a valid model of SmolLM2's geometry, the rounded-rank rows keep their bytes, the
profiler table and the max-batch search work."""

import importlib.util
from pathlib import Path

import pytest
import torch

from kvforge.models.configuration_kvforge import KVForgeConfig


@pytest.fixture(scope="module")
def benchmark():
    path = Path(__file__).resolve().parents[2] / "launch" / "benchmark_decode.py"
    spec = importlib.util.spec_from_file_location("benchmark_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_config(benchmark, spec_of):
    from transformers import LlamaConfig

    base = LlamaConfig(**benchmark.SMOLLM2)
    return KVForgeConfig.from_base_config(base, spec_of(base.num_hidden_layers))


def test_every_generate_row_is_a_valid_smollm2_model(benchmark):
    """A bad spec (an odd 4-bit rank, a rank above the width) would otherwise fail on the GPU, in device time."""
    for name, (_, spec_of, mode, cache) in benchmark.GENERATE_VARIANTS.items():
        assert mode in (None, "auto", "off", "triton") and cache in (None, "kvforge", "transformers"), name
        if spec_of is not None:
            config = smollm2_config(benchmark, spec_of)
            assert 0 < config.kv_cache_bytes(4096, dtype=torch.bfloat16) <= 2 * 30 * 3 * 64 * 2 * 4096, name


@pytest.mark.parametrize("rounded, greedy, multiple, bits", [
    ("lr25_int8_aligned_spec", "lr25_int8_spec", 16, 8), ("lr12_int4_aligned_spec", "lr12_int4_spec", 32, 4)])
def test_rounded_rank_rows_put_cache_rows_on_16_bytes_at_about_the_same_bytes(benchmark, rounded, greedy, multiple,
                                                                               bits):
    aligned, original = (smollm2_config(benchmark, getattr(benchmark, f)) for f in (rounded, greedy))
    for layer in aligned.compression_spec.layers:
        assert all(rank % multiple == 0 and rank * bits // 8 % 16 == 0 for rank in (layer.k_rank, layer.v_rank))
    a, o = (c.kv_cache_bytes(4096, dtype=torch.bfloat16) for c in (aligned, original))
    assert abs(a / o - 1) < 0.05


def test_the_profiler_table_of_a_generate_call(benchmark):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    table = benchmark.profiled_generate(model, torch.randint(3, 64, (2, 5)), 3, None)
    assert "aten::" in table and "Self CPU" in table


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
