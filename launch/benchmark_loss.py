"""Training-step benchmark on a GPU: the loss from full logits against the loss from hidden states
(trainer/losses.py), for cross-entropy and for distillation.

  python launch/benchmark_loss.py --json loss.json [--batch 16 --seq 2048]

SmolLM2-135M's architecture (49,152-token vocabulary, tied embeddings) with random weights; the student in
fp32 under bf16 autocast with a fused AdamW (plain PyTorch AMP), the teacher (for distillation) in bf16 without
gradients; SDPA attention. Per variant: warm-up steps, then the median step time over --steps steps (CUDA-
synchronized), tokens/s and the peak memory the step allocated.

    ce_logits        transformers' loss over the full logits (labels=...)
    ce_hidden        linear_distillation_loss(weight=0): the logits are never held
    distill_logits   distillation_loss(student logits, teacher logits), 0.5 CE + 0.5 KL, T = 1
    distill_hidden   linear_distillation_loss with the teacher's hidden states
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_decode import SMOLLM2  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, nargs="*", default=[1024],
                        help="positions per chunk of the hidden-state losses (trainer.losses.CHUNK_POSITIONS)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark_loss.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvforge.trainer import losses
    from kvforge.trainer.losses import distillation_loss, linear_distillation_loss

    config = LlamaConfig(**SMOLLM2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    student = LlamaForCausalLM(config).cuda().train()
    teacher = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device="cuda")

    def hidden_of(model, ids):
        return model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]

    def loss_of(variant: str) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if variant == "ce_logits":
                return student(input_ids=ids, labels=ids).loss
            if variant == "ce_hidden":
                return linear_distillation_loss(hidden_of(student, ids), student.lm_head.weight.to(torch.bfloat16),
                                                ids, weight=0.0)
            with torch.no_grad():
                teacher_out = teacher(input_ids=ids, output_hidden_states=(variant == "distill_hidden"),
                                      logits_to_keep=1 if variant == "distill_hidden" else 0)
            if variant == "distill_logits":
                return distillation_loss(student(input_ids=ids).logits, teacher_out.logits, ids, weight=0.5)
            return linear_distillation_loss(hidden_of(student, ids), student.lm_head.weight.to(torch.bfloat16), ids,
                                            weight=0.5, teacher_hidden=teacher_out.hidden_states[-1],
                                            teacher_head_weight=teacher.lm_head.weight)

    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}; micro batch {args.batch} x {args.seq}")
    rows = []
    variants = [("ce_logits", None), ("distill_logits", None)]
    variants += [(name, chunk) for chunk in args.chunk for name in ("ce_hidden", "distill_hidden")]
    for variant, chunk in variants:
        if chunk is not None:
            losses.CHUNK_POSITIONS = chunk
        times = []
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = loss_of(variant)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        row = dict(variant=variant, chunk=chunk, step_s=step, tokens_per_s=args.batch * args.seq / step,
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30, loss=loss.item())
        rows.append(row)
        print(f"{variant:16s} chunk {str(chunk):5s} {row['tokens_per_s']:9.0f} tok/s  step {step * 1e3:7.1f} ms  "
              f"peak {row['peak_memory_gib']:5.1f} GiB  loss {row['loss']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, torch=torch.__version__, batch=args.batch, seq=args.seq,
                                             command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), rows=rows),
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
