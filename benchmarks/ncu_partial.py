"""The partial-RoPE decode kernel launched a few times on one shape, for Nsight Compute to profile one launch:

    WRAP="ncu --clock-control none --kernel-name regex:_partial_rope --launch-skip 2 --launch-count 1 --set full \
        --import-source yes -o $OUT/partial" bash benchmarks/device_run.sh benchmarks/ncu_partial.py 128 4096 \
        split_columns=1

Arguments: batch, context, then partial_rope_decode_attention's launch settings as KEY=N (the defaults without
them). partial-rope-25-int8-long's layout: rank 96 beside 3 x 32 rotary dims, 8-bit (launch/benchmark_decode.py's
partial case, quantized as the cache stores it)."""
import sys

import torch

sys.path.insert(0, "launch")
from benchmark_decode import partial_rope_case  # noqa: E402

from kvforge.kernels.partial_rope_decode import partial_rope_decode_attention  # noqa: E402

batch, context = int(sys.argv[1]), int(sys.argv[2])
settings = {key: int(value) for key, value in (pair.split("=") for pair in sys.argv[3:])}
c = partial_rope_case(batch, context, 96, 32, 3, cache_bits=8)
for _ in range(5):
    partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"],
                                  c["kv_latent"], c["k_up"].weight, c["v_up"].weight, c["v_up"].bias, c["scaling"],
                                  valid=c["mask"][:, 0, 0, 0], k_rope_scale=c["k_rope_scale"],
                                  kv_latent_scale=c["kv_latent_scale"], **settings)
torch.cuda.synchronize()
print(f"B={batch} S={context} {settings}: ran")
