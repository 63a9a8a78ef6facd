"""Where the partial-RoPE decode step's time goes at one shape: each kernel's device time (torch.profiler) under the
defaults, then the whole call's CUDA-graph time per slot-split count, against the byte floor.

    bash benchmarks/device_run.sh benchmarks/profile_partial.py 64 4096 [rope_heads [warm-up]]

"warm-up": the three warm-up calls only, for Nsight Compute (WRAP="ncu --kernel-name regex:_partial_rope ...").

Rank 128 + 16 rotary dims per rope head, bf16 (launch/benchmark_decode.py's partial part, its case)."""
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

batch, context = int(sys.argv[1]), int(sys.argv[2])
rope_heads = int(sys.argv[3]) if len(sys.argv) > 3 else 3
warm_up_only = sys.argv[4:] == ["warm-up"]
sys.argv = [sys.argv[0]]
sys.path.insert(0, "launch")
from benchmark_decode import copy_bandwidth_bytes_per_s, partial_rope_case  # noqa: E402

from kvforge.kernels.partial_rope_decode import partial_rope_decode_attention  # noqa: E402

c = partial_rope_case(batch, context, 128, 16, rope_heads)
floor_us = batch * context * ((128 + rope_heads * 16) * 2 + 1) / copy_bandwidth_bytes_per_s() * 1e6


def call(**options):
    return partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"],
                                         c["kv_latent"], c["k_up"].weight, c["v_up"].weight, c["v_up"].bias,
                                         c["scaling"], valid=c["mask"][:, 0, 0, 0], **options)


with torch.no_grad():
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    if warm_up_only:
        sys.exit(0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
    print(f"B={batch} S={context} Kr={rope_heads}: byte floor {floor_us:.1f} us; per call, by kernel:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    for options in [dict()] + [dict(splits=s) for s in (4, 8, 16, 32, 64)]:
        us = triton.testing.do_bench_cudagraph(lambda: call(**options), rep=100, return_mode="median") * 1e3
        print(f"{options or 'defaults'}: {us:.1f} us ({floor_us / us:.0%} of the copy bandwidth)", flush=True)
