"""The fused distillation loss (kernels/distillation_loss.py) against the PyTorch chunks on a GPU, at a training
step's real shape: same loss, parts and gradients (bf16), and the time of each (forward + backward).

    python benchmarks/check_loss_gpu.py [--batch 16 --seq-len 2048 --dim 576 --vocab 49152 --weight 1.0]

Exits 1 when they differ beyond bf16 rounding, so a pipeline can fall back to KVFORGE_KERNELS=off.
"""
import argparse
import os
import sys
import time

import torch

from kvforge.trainer.losses import linear_distillation_loss_parts

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--dim", type=int, default=576)
parser.add_argument("--vocab", type=int, default=49152)
parser.add_argument("--weight", type=float, default=1.0)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
device, dtype = torch.device("cuda"), torch.bfloat16
head = (torch.randn(args.vocab, args.dim, device=device) * 0.05).to(dtype)
teacher_head = head + (torch.randn_like(head.float()) * 0.01).to(dtype)
hidden = torch.randn(args.batch, args.seq_len, args.dim, device=device, dtype=dtype)
teacher_hidden = hidden + 0.1 * torch.randn_like(hidden)
ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)


def step():
    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    loss, parts = linear_distillation_loss_parts(h, w, ids, weight=args.weight, temperature=args.temperature,
                                                 teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head)
    loss.backward()
    return loss.detach(), parts, h.grad, w.grad


results = {}
for mode in ("off", "auto"):
    os.environ["KVFORGE_KERNELS"] = mode
    results[mode] = step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.repeats):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - started) / args.repeats * 1e3
    print(f"KVFORGE_KERNELS={mode}: {ms:.1f} ms per loss forward + backward "
          f"({args.batch} x {args.seq_len} positions, vocab {args.vocab}, weight {args.weight})")

ok = True
(loss_ref, parts_ref, *grads_ref), (loss, parts, *grads) = results["off"], results["auto"]
print(f"loss {loss.item():.6f} vs {loss_ref.item():.6f}; parts {[(k, round(v.item(), 6)) for k, v in parts.items()]} "
      f"vs {[(k, round(v.item(), 6)) for k, v in parts_ref.items()]}")
ok &= abs(loss.item() - loss_ref.item()) <= 1e-4 * max(1.0, abs(loss_ref.item()))
for name, g, e in zip(("hidden", "head"), grads, grads_ref):
    rel = ((g.float() - e.float()).norm() / e.float().norm()).item()
    print(f"grad {name}: relative difference {rel:.2e}")
    ok &= rel < 2e-2
print("fused loss OK" if ok else "fused loss DIFFERS")
sys.exit(0 if ok else 1)
