"""GPU time of the latent decode kernel alone (torch.profiler), for block shapes / warps / stages, and the
compiler's register and spill counts: how kernels/latent_attention.py's defaults were chosen."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.argv = [sys.argv[0]]
sys.path.insert(0, "launch")
from benchmark_decode import kernel_case  # noqa: E402

from kvforge.kernels import latent_attention as la  # noqa: E402

results = []
for batch, context in ((64, 4096), (8, 16384)):
    c = kernel_case(batch, context, 48, 144)
    r = c["key_rotary"]

    def call(**options):
        return la.latent_decode_attention(c["query"][:, :, :, 0], c["k_latent"], c["v_latent"], c["k_up"].weight, None,
                                          c["v_up"].weight, None, r.positions, c["mask"][:, 0, 0, 0], r.inv_freq,
                                          r.scaling, c["scaling"], max_position=context - 1, **options)

    sweep = [dict(block_s=b, num_warps=w, num_stages=s) for b in (32, 64, 128) for w in (4, 8) for s in (2, 3)
             if b * s < 384]
    for options in sweep:
        try:
            call(**options)
        except Exception as err:  # e.g. triton's OutOfResources for shared memory
            print(f"B={batch} S={context} {options}: {type(err).__name__}")
            continue
        for _ in range(3):
            call(**options)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call(**options)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events) / 10
        kernel = sum(e.device_time_total for e in events if "latent_decode" in e.key) / 10
        results.append((kernel, batch, context, options, total))
        print(f"B={batch} S={context} {options}: GPU {total:.1f} us per call, kernel {kernel:.1f} us", flush=True)

for caches in la._latent_decode_kernel.device_caches.values():
    for compiled in caches[0].values():
        print("compiled:", {k: getattr(compiled, k, None) for k in ("n_regs", "n_spills")},
              {k: getattr(compiled.metadata, k, None) for k in ("num_warps", "num_stages", "shared")})
print("best per shape:")
for shape in sorted({(b, s) for _, b, s, _, _ in results}):
    best = min(r for r in results if (r[1], r[2]) == shape)
    print(f"  B={shape[0]} S={shape[1]}: kernel {best[0]:.1f} us with {best[3]} (call {best[4]:.1f} us)")
