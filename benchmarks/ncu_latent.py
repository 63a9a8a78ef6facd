"""The 8-bit pre-RoPE latent kernel launched a few times on one shape, for Nsight Compute to profile one launch:

    WRAP="ncu --clock-control none --kernel-name regex:_latent_decode --launch-skip 2 --launch-count 1 --set full \
        --import-source yes -o $OUT/latent" bash benchmarks/device_run.sh benchmarks/ncu_latent.py 32 16384 \
        half_rope_table=1 max_registers=168

Arguments: batch, context, then latent_decode_attention's launch settings as KEY=N (the defaults without them).
Ranks 48 / 144 (the 25% recipe's, aligned), random latents quantized as the cache stores them."""
import sys

import torch

sys.path.insert(0, "launch")
from benchmark_decode import kernel_case  # noqa: E402

from kvforge.kernels.latent_attention import latent_decode_attention  # noqa: E402
from kvforge.models.modeling_kvforge import quantize_slots  # noqa: E402

batch, context = int(sys.argv[1]), int(sys.argv[2])
settings = {key: int(value) for key, value in (pair.split("=") for pair in sys.argv[3:])}
c = kernel_case(batch, context, 48, 144)
(k_q, k_scale), (v_q, v_scale) = (quantize_slots(c[name], 1, 8) for name in ("k_latent", "v_latent"))
r = c["key_rotary"]
for _ in range(5):
    latent_decode_attention(c["query"][:, :, :, 0], k_q, v_q, c["k_up"].weight, None, c["v_up"].weight, None,
                            r.positions, c["mask"][:, 0, 0, 0], r.inv_freq, r.scaling, c["scaling"],
                            max_position=context - 1, k_scale=k_scale, v_scale=v_scale, **settings)
torch.cuda.synchronize()
print(f"B={batch} S={context} {settings}: ran")
