"""Tokens/s of the teacher-samples sampler (trainer/sampling.py) and where a decode step's GPU time goes.

    python benchmarks/profile_sampler.py --model <dir or .gguf> [--batch 1024 --length 2048 --top-p 0.95]

Measured on the H200 in the recovery runs (docs/results/recovery-h200): 39.5k tokens/s at 1,024 x 2,048 in bf16,
where the KV bytes read per step allow ~4x that. This splits a step into the model (one CUDA graph replay per
step) and the sampling (temperature, top-p, multinomial), and lists the top CUDA kernels of a few steps.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvforge.models.loading import load_pretrained
from kvforge.trainer.data import _SampleWarper
from kvforge.trainer.sampling import StaticCacheSampler

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m-instruct")
parser.add_argument("--batch", type=int, default=1024)
parser.add_argument("--length", type=int, default=2048)
parser.add_argument("--top-p", type=float, default=0.95)
parser.add_argument("--cuda-graphs", type=int, default=1)
parser.add_argument("--attention", default="auto", choices=["auto", "triton", "matmul", "sdpa"])
args = parser.parse_args()

model, _ = load_pretrained(args.model, dtype="bfloat16", device=torch.device("cuda"))
model.eval()
sampler = StaticCacheSampler(model, args.batch, args.length, cuda_graphs=bool(args.cuda_graphs),
                             attention=args.attention)
warper = _SampleWarper(torch.linspace(0.7, 1.0, args.batch), args.top_p, [])
prompt = torch.zeros(args.batch, 1, dtype=torch.long)


def warp(scores):
    return warper(None, scores)


sampler.sample(prompt, 300, warp)  # captures the first spans' graphs
torch.cuda.synchronize()
started = time.perf_counter()
sampler.sample(prompt, args.length - 1, warp)
torch.cuda.synchronize()
seconds = time.perf_counter() - started
print(f"{args.batch} x {args.length}: {args.batch * (args.length - 1) / seconds:,.0f} tokens/s ({seconds:.1f} s), "
      f"{len(sampler.graphs)} graphs")

# A few steps late in the sequence: the model alone, then the model and sampling.
position = args.length - 64
token = torch.zeros(args.batch, dtype=torch.long, device="cuda")
for label, sample in (("model", False), ("model + sampling", True)):
    for _ in range(3):
        logits = sampler._decode(token, position)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(10):
            logits = sampler._decode(token, position)
            if sample:
                torch.multinomial(warp(logits.float()).softmax(dim=-1), 1)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - started) * 100
    print(f"\n{label}: {step_ms:.2f} ms per step at position {position}")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))
