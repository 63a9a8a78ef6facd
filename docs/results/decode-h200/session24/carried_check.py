"""Session 24, call 2: which partial-RoPE kernel settings fault on the H200 (call 1: an illegal memory access in
the first --carried-tiles 0 1 --programs-per-sm 2 3 sweep's float64 check). Each setting runs in its own process
(a fault poisons the CUDA context) with CUDA_LAUNCH_BLOCKING=1, at the benchmark's check shape (B=4, S=3000).

    python docs/results/decode-h200/session24/carried_check.py            # every case
    python docs/results/decode-h200/session24/carried_check.py CASE_JSON  # one case (the child)
"""
import copy
import json
import os
import subprocess
import sys

CASES = [
    dict(bits=8, programs_per_sm=2),
    dict(bits=8, programs_per_sm=3),
    dict(bits=8, carried_tiles=1, programs_per_sm=2),
    dict(bits=8, carried_tiles=1, half_products=0),
    dict(bits=16, carried_tiles=1),
    dict(bits=8, carried_tiles=1, prefetch_slots=0),
    dict(bits=8, carried_tiles=1, num_stages=1),
    dict(bits=8, carried_tiles=1, slot_rows=0),
]


def one(case):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "launch"))
    from benchmark_decode import partial_rope_case

    from kvforge.kernels.partial_rope_decode import partial_rope_decode_attention
    from kvforge.models.modeling_kvforge import partial_rope_attention

    settings = {k: v for k, v in case.items() if k != "bits"}
    worst = 0.0
    for rope_heads in (3, 1):
        c = partial_rope_case(4, 3000, 96, 32, rope_heads, seed=1, cache_bits=case["bits"])
        scales = {k: c[k] for k in ("k_rope_scale", "kv_latent_scale") if k in c}

        def f64(name):
            v = c[name].double()
            return v * c[name + "_scale"].double() if name + "_scale" in c else v

        with torch.no_grad():
            ref, _ = partial_rope_attention(c["query_rope"].double(), c["query_nope"].double(), f64("k_rope"),
                                            f64("kv_latent"), copy.deepcopy(c["k_up"]).double(),
                                            copy.deepcopy(c["v_up"]).double(), c["mask"], c["scaling"], absorb=True)
            out = partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"],
                                                c["kv_latent"], c["k_up"].weight, c["v_up"].weight, c["v_up"].bias,
                                                c["scaling"], valid=c["mask"][:, 0, 0, 0], **settings, **scales)
            torch.cuda.synchronize()
        worst = max(worst, ((out.double() - ref[:, :, :, 0]).norm() / ref.norm()).item())
    print(f"ok {case}: relative error {worst:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(json.loads(sys.argv[1]))
    else:
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        for case in CASES:
            run = subprocess.run([sys.executable, __file__, json.dumps(case)], env=env, capture_output=True, text=True)
            print(run.stdout.strip() or f"FAULT {case}: " + run.stderr.strip().splitlines()[-1])
