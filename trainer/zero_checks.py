"""ZeRO-1/2's gradient checks before each optimizer step, in a few fused launches instead of a dozen per tensor.

Before every step DeepSpeed's ZeRO-1/2 optimizer (0.19) tests each gradient partition for inf/NaN on its own
(`has_overflow_partitioned_grads_serial`: amax, amin, two isfinite, which are four kernels each, and more per
tensor) and takes the gradient norm one tensor at a time (`get_grad_norm_direct`: a float64 copy and a vector norm
per tensor). SmolLM2's 30 layers make 392 tensors, and the checks ~6,000 kernel launches a step: a profiled step of
the 12.5% recipe on an H200 took 279.8 ms of wall time over 165.2 ms of GPU time, 8,517 launches, `aten::isfinite`
alone 37.6 ms of host time (docs/TRAINING.md, session 16). Here both checks run as torch._foreach_norm over every
tensor at once (what torch.nn.utils.clip_grad_norm_ does): the largest magnitude per tensor for the overflow check
(finite exactly when every value is; it cannot overflow), the L2 norm per tensor for the gradient norm (accumulated
in float32 per tensor, then summed in float64 as DeepSpeed does).

Two guards against a DeepSpeed or PyTorch whose behaviour differs from what this replaces: before installing,
the fused checks must find NaN, +inf and -inf in tensors on the training device and match a float64 norm; and the
first call of each also computes DeepSpeed's own answer and, if the two differ, puts DeepSpeed's method back for
the rest of the run and says so. Only the plain case is fused (ZeRO-1/2 without CPU offload, no model or pipeline
parallelism); every other case keeps DeepSpeed's methods. `deepspeed.fused_gradient_checks: false` keeps them always.
"""

from __future__ import annotations

import types
from typing import Callable

import torch


def fuse_gradient_checks(optimizer, log: Callable[[str], None] = print) -> bool:
    """Give a DeepSpeed ZeRO-1/2 `optimizer` fused overflow and norm checks (instance methods; the class is
    untouched). Returns whether it did; when not, the log says why."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False  # ZeRO-0 or 3: other internals, untouched
    needed = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "averaged_gradients", "bit16_groups",
              "cpu_offload", "model_parallel_rank", "dp_process_group", "_model_parallel_all_reduce", "device")
    missing = [name for name in needed if not hasattr(optimizer, name)]
    if missing:
        log(f"fused gradient checks: off, this DeepSpeed's ZeRO optimizer has no {', '.join(missing)}")
        return False
    if optimizer.cpu_offload or optimizer.model_parallel_rank != 0 or _model_parallel(optimizer):
        return False
    device = torch.device(optimizer.device)  # a name ("cuda:0") or a device
    try:
        problem = self_test(device)
    except Exception as error:  # e.g. a PyTorch whose _foreach_norm refuses these arguments
        problem = f"{type(error).__name__}: {error}"
    if problem:
        log(f"fused gradient checks: off, {problem} on {device}")
        return False
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(
        _verified_once(_fused_overflow, "has_overflow_partitioned_grads_serial", _same_flag, log), optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(
        _verified_once(_fused_grad_norm, "get_grad_norm_direct", _same_norm, log), optimizer)
    return True


def any_non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bool tensor [1]: whether any of `tensors` holds a NaN or an infinity (no synchronization)."""
    tensors = [t for t in tensors if t.numel()]  # the infinity norm of nothing is an error, not 0
    if not tensors:
        return torch.zeros(1, dtype=torch.bool)
    largest = torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float32))
    return largest.isfinite().all().logical_not().reshape(1)


def l2_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's L2 norm, accumulated in float32 (bf16 gradients too), as float64 [len(tensors)]."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).to(torch.float64)


def self_test(device: torch.device) -> str | None:
    """What the fused checks get wrong on `device` (None: nothing), for float32 and bfloat16 gradients: NaN and
    infinities found in any tensor of a list, finite values (the largest included) not, and L2 norms within 1e-5
    of float64's over the same values."""
    for dtype in (torch.float32, torch.bfloat16):
        def case(*values):
            return torch.tensor(values, dtype=dtype, device=device)

        largest = torch.finfo(dtype).max
        clean = [case(1.0, -2.0), case(largest, -largest), torch.zeros(0, dtype=dtype, device=device)]
        for name, bad in (("NaN", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))):
            if not bool(any_non_finite([*clean, case(0.5, bad, 1.0)])):
                return f"a {name} in {dtype} was not found"
        if bool(any_non_finite(clean)):
            return f"finite {dtype} values were taken for an overflow"
        tensors = [(torch.arange(1000, device=device) / 7).to(dtype), case(3.0, 4.0)]
        expected = [float(t.double().norm()) for t in tensors]
        got = l2_norms(tensors).tolist()
        if any(abs(g - e) > 1e-5 * e for g, e in zip(got, expected)):
            return f"{dtype} L2 norms {got} against {expected}"
    return None


def _model_parallel(optimizer) -> bool:
    """Whether any parameter is replicated by pipeline parallelism or split by tensor parallelism: DeepSpeed's
    norm counts those specially, so they keep its method."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    params = (p for group in optimizer.bit16_groups for p in group)
    return any(getattr(p, "ds_pipe_replicated", False) or is_model_parallel_parameter(p) for p in params)


def _fused_overflow(self) -> torch.Tensor:
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    return any_non_finite(grads).to(self.device)


def _fused_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeed's get_grad_norm_direct for L2 and no model parallelism (fuse_gradient_checks leaves the rest to
    DeepSpeed): the sum over ranks of each partition's squared norms, its root, NaN or infinity masked as -1."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        total = l2_norms(grads).pow(2).sum().float().to(self.device)
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _same_flag(fused: torch.Tensor, original: torch.Tensor) -> bool:
    return bool(fused.bool().any()) == bool(original.bool().any())


def _same_norm(fused: torch.Tensor, original: torch.Tensor) -> bool:
    fused, original = float(fused), float(original)
    return fused == original or abs(fused - original) <= 1e-4 * abs(original)


def _verified_once(fused: Callable, name: str, same: Callable, log: Callable[[str], None]) -> Callable:
    """`fused`, whose first call also runs DeepSpeed's `name` on the same arguments: if the answers differ, the
    instance takes DeepSpeed's method back (for the rest of the run) and DeepSpeed's answer is returned. Both do
    the same collectives, so ranks stay in step whichever one a rank runs."""
    def first_call(self, *args, **kwargs):
        original = getattr(type(self), name)
        answer = fused(self, *args, **kwargs)
        expected = original(self, *args, **kwargs)
        if same(answer, expected):
            setattr(self, name, types.MethodType(fused, self))
            return answer
        log(f"fused gradient checks: {name} gave {answer.tolist()} where DeepSpeed's gives {expected.tolist()}; "
            "DeepSpeed's method from here on")
        delattr(self, name)
        return expected

    return first_call
