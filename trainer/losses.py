"""Training losses: next-token cross-entropy, optionally mixed with distillation from a teacher.

The logits of a 49k-vocabulary model are the largest activations in the step. `distillation_loss` takes
logits and does the fp32 work a chunk of positions at a time; `linear_distillation_loss` takes the final hidden
states and the output projection and never holds the whole batch's logits at all (what training uses when
distilling: `training.loss_from`).

Both come in two forms: `distillation_loss` / `linear_distillation_loss` return the loss, and the `*_parts` forms
also return its parts for logging (detached): `ce`, the mean cross-entropy per predicted token, and, when
distilling, `kl`, the mean KL(teacher_T || student_T) per predicted token before the T^2 scale, so that

    loss = (1 - weight) * ce + weight * T^2 * kl.

On a GPU the chunked loss's elementwise work (CE, KL and the logits' gradient) runs as one Triton kernel per chunk
(kernels/distillation_loss.py; KVFORGE_KERNELS=off keeps the PyTorch form below, which is its reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import dispatch
from ..kernels.distillation_loss import distillation_rows

CHUNK_POSITIONS = 1024


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
                      weight: float, temperature: float = 1.0) -> torch.Tensor:
    """(1 - weight) * CE(student, next tokens) + weight * T^2 * KL(teacher_T || student_T), per predicted token
    (`distillation_loss_parts` without the parts)."""
    return distillation_loss_parts(student_logits, teacher_logits, input_ids, weight=weight, temperature=temperature)[0]


def distillation_loss_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
                            weight: float, temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (1 - weight) * CE(student, next tokens) + weight * T^2 * KL(teacher_T || student_T), per predicted
    token, and its parts {"ce", "kl"} (detached; "kl" only when weight > 0).

    Args:
        student_logits, teacher_logits: [B, L, V] logits for the same inputs.
        input_ids: [B, L]; position t predicts token t + 1 (the last position predicts nothing).
        weight: 0 = pure cross-entropy, 1 = pure distillation.
        temperature: softens both distributions; T^2 keeps the gradient scale independent of T (Hinton et al.).

    Raises:
        ValueError: the two logits differ in shape.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same tokenizer and inputs)")
    vocab = student_logits.shape[-1]
    student_BLV = student_logits[:, :-1].reshape(-1, vocab)
    teacher_BLV = teacher_logits[:, :-1].reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1)
    ce_sum = student_BLV.new_zeros((), dtype=torch.float32)
    kl_sum = student_BLV.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), CHUNK_POSITIONS):
        s = student_BLV[start:start + CHUNK_POSITIONS].float()
        if weight < 1:
            ce_sum = ce_sum + F.cross_entropy(s, targets[start:start + CHUNK_POSITIONS], reduction="sum")
        else:  # pure distillation: cross-entropy is only logged
            with torch.no_grad():
                ce_sum = ce_sum + F.cross_entropy(s, targets[start:start + CHUNK_POSITIONS], reduction="sum")
        if weight > 0:
            t = teacher_BLV[start:start + CHUNK_POSITIONS].float()
            kl_sum = kl_sum + F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                                       log_target=True, reduction="sum")
    n = targets.numel()
    parts = {"ce": ce_sum.detach() / n}
    if weight > 0:
        parts["kl"] = kl_sum.detach() / n
    return (1 - weight) * ce_sum / n + weight * temperature**2 * kl_sum / n, parts


def linear_distillation_loss(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor, *,
                             weight: float, temperature: float = 1.0, teacher_hidden: torch.Tensor | None = None,
                             teacher_head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`distillation_loss` from the hidden states (`linear_distillation_loss_parts` without the parts)."""
    return linear_distillation_loss_parts(hidden, head_weight, input_ids, weight=weight, temperature=temperature,
                                          teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head_weight)[0]


def linear_distillation_loss_parts(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor, *,
                                   weight: float, temperature: float = 1.0, teacher_hidden: torch.Tensor | None = None,
                                   teacher_head_weight: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`distillation_loss_parts` from the hidden states, without ever holding the [B, L, V] logits.

    The output projection is done CHUNK_POSITIONS positions at a time, for the student and the teacher; each
    chunk's loss and its gradients with respect to the hidden states and the head weight are computed right
    away (as Liger's fused linear cross-entropy does), so memory holds one chunk of logits in fp32 instead of the
    student's logits, their gradient and the teacher's logits for the whole batch.

    Args:
        hidden: [B, L, E] the student's final (normed) hidden states; head_weight: [V, E] its output projection
            (no bias). teacher_hidden / teacher_head_weight: the same for the teacher (needed when weight > 0).
        input_ids, weight, temperature: as in `distillation_loss`.

    Raises:
        ValueError: distillation without the teacher's hidden states or head, or vocabularies that differ.
    """
    if weight > 0 and (teacher_hidden is None or teacher_head_weight is None):
        raise ValueError(f"distillation weight {weight} needs the teacher's hidden states and head weight")
    if weight > 0 and teacher_head_weight.shape[0] != head_weight.shape[0]:
        raise ValueError(f"student vocabulary {head_weight.shape[0]} and teacher vocabulary "
                         f"{teacher_head_weight.shape[0]} differ (same tokenizer needed)")
    dim = hidden.shape[-1]
    student = hidden[:, :-1].reshape(-1, dim)
    teacher = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).detach() if weight > 0 else None
    targets = input_ids[:, 1:].reshape(-1)
    loss, ce, kl = _LinearDistillation.apply(student, head_weight, teacher, teacher_head_weight, targets, weight,
                                             temperature)
    return loss, ({"ce": ce, "kl": kl} if weight > 0 else {"ce": ce})


class HiddenStateLoss(torch.nn.Module):
    """`linear_distillation_loss_parts` through the student's own output projection, as a parameter-free submodule
    of the student. Added before DeepSpeed wraps the model, it gets ZeRO-3's hooks: with the projection's weight
    registered as its external parameter, ZeRO-3 gathers that partitioned weight for this module's forward and
    again for its backward, so the chunked loss (no [B, L, V] logits) works at every ZeRO stage."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self._head = (head,)  # held, not registered: the weight keeps its one state-dict name (lm_head.weight)

    @property
    def head_weight(self) -> torch.nn.Parameter:
        return self._head[0].weight

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, weight: float, temperature: float = 1.0,
                teacher_hidden: torch.Tensor | None = None, teacher_head_weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return linear_distillation_loss_parts(hidden, self.head_weight, input_ids, weight=weight,
                                              temperature=temperature, teacher_hidden=teacher_hidden,
                                              teacher_head_weight=teacher_head_weight)


class _LinearDistillation(torch.autograd.Function):
    """Loss and gradients chunk by chunk in the forward pass; the backward pass only scales them. Also returns the
    mean cross-entropy and KL (no gradient: they are for logging)."""

    @staticmethod
    def forward(ctx, hidden, head_weight, teacher_hidden, teacher_head_weight, targets, weight, temperature):
        n = targets.numel()
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(head_weight, dtype=torch.float32) if head_weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kl_sum = hidden.new_zeros((), dtype=torch.float32)
        fused = dispatch.use_triton(hidden, float32_exact=True)
        for start in range(0, n, CHUNK_POSITIONS):
            rows = slice(start, start + CHUNK_POSITIONS)
            h = hidden[rows]
            if fused:  # kernels/distillation_loss.py: the same arithmetic in one kernel, gradient in place
                logits = h @ head_weight.t()
                teacher_logits = teacher_hidden[rows] @ teacher_head_weight.t() if weight > 0 else None
                ce_rows, kl_rows = distillation_rows(logits, teacher_logits, targets[rows], weight=weight,
                                                     temperature=temperature, scale=1.0 / n,
                                                     write_grad=grad_hidden is not None or grad_weight is not None)
                ce_sum += ce_rows.sum()
                kl_sum += kl_rows.sum()
                if grad_hidden is not None:
                    grad_hidden[rows] = logits @ head_weight
                if grad_weight is not None:
                    grad_weight += (logits.t() @ h).float()
                continue
            logits = (h @ head_weight.t()).float()  # [n, V]; matmul in the training dtype, as lm_head does
            dlogits = None
            target = targets[rows]
            lse = torch.logsumexp(logits, dim=-1)
            log_likelihood = (logits.gather(1, target[:, None])[:, 0] - lse).sum()
            ce_sum -= log_likelihood  # logged even when weight = 1 (then it adds no gradient)
            if weight < 1:
                total = total - (1 - weight) * log_likelihood
                # d CE / d logits = softmax - one_hot
                dlogits = torch.exp(logits - lse[:, None]).mul_(1 - weight)
                dlogits[torch.arange(len(target), device=target.device), target] -= 1 - weight
            if weight > 0:
                teacher_logits = (teacher_hidden[rows] @ teacher_head_weight.t()).float()
                log_p = torch.log_softmax(teacher_logits.div_(temperature), dim=-1)
                log_q = torch.log_softmax(logits.div_(temperature), dim=-1)
                p = log_p.exp()
                kl = (p * (log_p - log_q)).sum()
                kl_sum += kl
                total = total + weight * temperature ** 2 * kl
                # d/dlogits of T^2 KL(p || softmax(logits / T)) = T (softmax(logits / T) - p)
                kl_grad = log_q.exp_().sub_(p).mul_(weight * temperature)
                dlogits = kl_grad if dlogits is None else dlogits.add_(kl_grad)
            dlogits = (dlogits / n).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = dlogits @ head_weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ h).float()
        if fused:
            total = (1 - weight) * ce_sum + (weight * temperature ** 2 * kl_sum if weight > 0 else 0.0)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.head_dtype = head_weight.dtype
        ce, kl = ce_sum / n, kl_sum / n
        ctx.mark_non_differentiable(ce, kl)
        return total / n, ce, kl

    @staticmethod
    def backward(ctx, grad_output, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.head_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
