"""The dense GQA decode kernel (kernels/gqa_decode.py) against softmax attention in float64, on CPU through
Triton's interpreter: lengths that end mid-block and at the end of the cache, one split and several (some empty),
a cache slice of a larger buffer, and the length read from a tensor (what lets one CUDA graph serve every
position)."""

import os

import pytest
import torch

from kvforge.kernels.gqa_decode import available, decode_splits, gqa_decode_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def reference(query, keys, values, length, scaling):
    q, k, v = query.double(), keys[:, :, :length].double(), values[:, :, :length].double()
    return ((q @ k.transpose(-1, -2)) * scaling).softmax(dim=-1) @ v


def test_triton_is_installed():
    assert available(), "triton is not importable: install the test extra (pip install -e '.[test]')"


@pytest.mark.parametrize("length, splits", [(1, 1), (37, 1), (37, 3), (100, 4), (130, 8), (130, 2)])
def test_decode_attention_matches_softmax_attention(length, splits):
    torch.manual_seed(length * 10 + splits)
    B, Hkv, G, D, capacity = 2, 3, 3, 32, 160
    buffer_k, buffer_v = torch.randn(B, Hkv, capacity + 20, D), torch.randn(B, Hkv, capacity + 20, D)
    keys, values = buffer_k[:, :, :capacity], buffer_v[:, :, :capacity]  # a slice: strides of the buffer
    query = torch.randn(B, Hkv, G, D)
    keys[:, :, length:] = float("nan")  # slots past the length must never be read
    out = gqa_decode_attention(query, keys, values, torch.tensor([length]), 0.125, splits=splits, block_s=16)
    torch.testing.assert_close(out.double(), reference(query, keys, values, length, 0.125), rtol=1e-5, atol=1e-5)


def test_splits_cover_the_gpu_and_bad_shapes_are_refused():
    assert decode_splits(3072, 2048) == 1 and decode_splits(12, 2048) == 32 and decode_splits(12, 100) == 2
    query, cache = torch.randn(1, 3, 3, 24), torch.randn(1, 3, 8, 24)
    with pytest.raises(ValueError, match="head dim 24 must be a power of two"):
        gqa_decode_attention(query, cache, cache, torch.tensor([4]), 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, Hkv, G, D\] and \[B, Hkv, S, D\]"):
        gqa_decode_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16),
                             torch.tensor([4]), 1.0)
