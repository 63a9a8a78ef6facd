"""Cross-entropy and distillation loss over a chunk of logits, with their gradient, in one Triton kernel.

trainer/losses.py's chunked loss (`_LinearDistillation`) projects a chunk of positions to the vocabulary for the
student and the teacher, then needs, per position: CE against the next token, KL(teacher_T || student_T), and
d loss / d student logits. In PyTorch that is a dozen elementwise kernels over [chunk, V] fp32 tensors (casts,
two log_softmax, exp, sub, mul, sum, the gradient's exp_ / sub_ / mul_, the divide and the cast back): on an
H200 about 100 ms of a 330 ms distillation step for SmolLM2 (docs/TRAINING.md, the profiles of
docs/results/train-h200). This kernel reads both chunks of logits twice and writes the gradient once, in the
student logits' own buffer (they are not needed afterwards):

    pass 1, over the vocabulary in blocks:  running max and sum of exp for s, s / T and t / T  (three log-sum-exps)
    pass 2:  log_q = s / T - lse(s / T), log_p = t / T - lse(t / T), p = exp(log_p)
             kl += p (log_p - log_q)
             grad = (1 - w) (softmax(s) - onehot(target)) + w T (exp(log_q) - p), times `scale`, stored over s

with loss = (1 - w) CE + w T^2 KL per position (Hinton's T^2 keeps the gradient's scale independent of T). One
program per position; the per-position CE and KL come back in fp32 for the caller to sum and log. Arithmetic is
fp32 on logits in the training dtype, as the PyTorch path does after its `.float()`.

Imports triton inside `try`: without it (a CPU-only install) `available()` says False and the PyTorch path serves.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _online_lse(m, d, x):
        """Folds a block x into a running (max, sum of exp(. - max)); -inf entries add nothing."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        return m_new, d

    @triton.jit
    def _distillation_rows_kernel(
        STUDENT, TEACHER, TARGETS, CE, KL,
        stride_s, stride_t, vocab, weight, inv_temperature, temperature, scale,
        HAS_TEACHER: tl.constexpr, WITH_CE_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = STUDENT + row * stride_s
        t_row = TEACHER + row * stride_t
        cols = tl.arange(0, BLOCK_V)
        neg_inf = float("-inf")
        zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)  # a fp32 scalar that loops can carry
        # Running sums start at 1: the first block scales them by exp(-inf) = 0 (and without a teacher, the unused
        # log-sum-exps stay -inf rather than log(0)).
        m_s, d_s = zero + neg_inf, zero + 1.0
        m_sT, d_sT = zero + neg_inf, zero + 1.0
        m_t, d_t = zero + neg_inf, zero + 1.0
        for start in range(0, vocab, BLOCK_V):
            mask = start + cols < vocab
            s = tl.load(s_row + start + cols, mask=mask, other=neg_inf).to(tl.float32)
            m_s, d_s = _online_lse(m_s, d_s, s)
            if HAS_TEACHER:
                t = tl.load(t_row + start + cols, mask=mask, other=neg_inf).to(tl.float32)
                m_sT, d_sT = _online_lse(m_sT, d_sT, s * inv_temperature)
                m_t, d_t = _online_lse(m_t, d_t, t * inv_temperature)
        lse_s = m_s + tl.log(d_s)
        target = tl.load(TARGETS + row)
        tl.store(CE + row, lse_s - tl.load(s_row + target).to(tl.float32))
        lse_sT = m_sT + tl.log(d_sT)
        lse_t = m_t + tl.log(d_t)
        kl = zero
        if WRITE_GRAD or HAS_TEACHER:
            for start in range(0, vocab, BLOCK_V):
                mask = start + cols < vocab
                s = tl.load(s_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
                if WITH_CE_GRAD:
                    onehot = tl.where(start + cols == target, 1.0, 0.0)
                    grad += (1.0 - weight) * (tl.exp(s - lse_s) - onehot)
                if HAS_TEACHER:
                    t = tl.load(t_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                    log_p = t * inv_temperature - lse_t
                    log_q = s * inv_temperature - lse_sT
                    p = tl.exp(log_p)
                    kl += tl.sum(tl.where(mask, p * (log_p - log_q), 0.0), axis=0)
                    grad += weight * temperature * (tl.exp(log_q) - p)
                if WRITE_GRAD:
                    tl.store(s_row + start + cols, (grad * scale).to(STUDENT.dtype.element_ty), mask=mask)
        tl.store(KL + row, kl)


def distillation_rows(student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, *, weight: float,
                      temperature: float, scale: float, write_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE and KL(teacher_T || student_T) (fp32 [n] each; KL zero without a teacher) of `student`
    logits [n, V] against `targets` [n] and `teacher` logits [n, V]; with `write_grad`, `student` is overwritten
    by scale * d((1 - w) CE + w T^2 KL) / d student (in its own dtype). Rows must be contiguous in the vocabulary."""
    n, vocab = student.shape
    if student.stride(-1) != 1 or (teacher is not None and (teacher.stride(-1) != 1 or teacher.shape != student.shape)):
        raise ValueError(f"distillation_rows needs [n, V] logits with a contiguous vocabulary: student "
                         f"{tuple(student.shape)} stride {student.stride()}, teacher "
                         f"{None if teacher is None else (tuple(teacher.shape), teacher.stride())}")
    ce = torch.empty(n, device=student.device, dtype=torch.float32)
    kl = torch.empty(n, device=student.device, dtype=torch.float32)
    if n == 0:
        return ce, kl
    has_teacher = teacher is not None and weight > 0
    _distillation_rows_kernel[(n,)](
        student, teacher if has_teacher else student, targets.contiguous(), ce, kl,
        student.stride(0), teacher.stride(0) if has_teacher else 0, vocab, float(weight), 1.0 / temperature,
        float(temperature), float(scale),
        HAS_TEACHER=has_teacher, WITH_CE_GRAD=weight < 1, WRITE_GRAD=write_grad,
        BLOCK_V=min(4096, triton.next_power_of_2(vocab)), num_warps=8,
    )
    return ce, kl
