"""Host work of a DeepSpeed ZeRO-2 optimizer step with and without kvforge's fused gradient checks
(trainer/zero_checks.py): aten ops and time of one profiled `engine.step()`, on a model of as many parameter
tensors as SmolLM2's student (392), in a world of one on this machine's device.

    python benchmarks/zero_step_ops.py [--tensors 392]

A CPU gives the op counts (what a GPU launches as kernels) and a host-side time; the GPU's step time is measured
through launch/train.py (docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=392, help="parameter tensors (weights and biases)")
    parser.add_argument("--steps", type=int, default=5, help="steps before the profiled one")
    args = parser.parse_args()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29659")}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    from kvforge.trainer.zero_checks import fuse_gradient_checks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(args.tensors // 2)]).to(device)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    x = torch.randn(4, 16, dtype=torch.bfloat16, device=device)
    for fused in (False, True):
        copied = copy.deepcopy(model)
        engine, *_ = deepspeed.initialize(model=copied, optimizer=torch.optim.AdamW(copied.parameters()),
                                          config=config)
        if fused:
            assert fuse_gradient_checks(engine.optimizer), "fused checks refused (see the log above)"
        for _ in range(args.steps):
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
        engine.backward(engine(x).float().pow(2).mean())
        with torch.profiler.profile() as profiler:
            started = time.perf_counter()
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        ops = sum(e.count for e in profiler.key_averages() if e.key.startswith("aten::"))
        print(f"{device.type}, {args.tensors} tensors, fused checks {'on ' if fused else 'off'}: "
              f"optimizer step {seconds * 1e3:.1f} ms (profiled), {ops} aten ops", flush=True)


if __name__ == "__main__":
    main()
