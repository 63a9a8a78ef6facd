"""Training losses: next-token cross-entropy, optionally mixed with distillation from a teacher.

The logits of a 49k-vocabulary model are the largest activations in the step, so the fp32 work is
done a chunk of positions at a time (the bf16 logits are never upcast all at once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_POSITIONS = 1024


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, *,
                      weight: float, temperature: float = 1.0) -> torch.Tensor:
    """(1 - weight) * CE(student, next tokens) + weight * T^2 * KL(teacher_T || student_T), per predicted token.

    Args:
        student_logits, teacher_logits: [B, L, V] logits for the same inputs.
        input_ids: [B, L]; position t predicts token t + 1 (the last position predicts nothing).
        weight: 0 = pure cross-entropy, 1 = pure distillation.
        temperature: softens both distributions; T^2 keeps the gradient scale independent of T (Hinton et al.).
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
        if weight > 0:
            t = teacher_BLV[start:start + CHUNK_POSITIONS].float()
            kl_sum = kl_sum + F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                                       log_target=True, reduction="sum")
    n = targets.numel()
    return (1 - weight) * ce_sum / n + weight * temperature**2 * kl_sum / n
