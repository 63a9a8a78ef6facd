"""The fused distillation-loss kernel (kernels/distillation_loss.py) against the PyTorch chunked loss it replaces
(trainer/losses.py with KVFORGE_KERNELS=off) and against the textbook formulas, on CPU through Triton's
interpreter: loss values, logged parts and both gradients, for pure CE, a mix and pure distillation, with a
temperature, ragged chunks and a vocabulary that is not a multiple of the kernel's block."""

import os

import pytest
import torch
import torch.nn.functional as F

from kvforge.kernels.distillation_loss import available, distillation_rows
from kvforge.trainer import losses

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def test_triton_is_installed():
    assert available(), "triton is not importable: install the test extra (pip install -e '.[test]')"


@pytest.mark.parametrize("weight, temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0), (1.0, 0.7)])
def test_rows_match_the_textbook_ce_kl_and_gradient(weight, temperature):
    torch.manual_seed(0)
    n, vocab = 5, 4100  # two blocks of 4096, the second almost empty
    student = (3 * torch.randn(n, vocab, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(n, vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,))
    ce_ref = F.cross_entropy(student, targets, reduction="none")
    log_p = F.log_softmax(teacher / temperature, -1)
    kl_ref = (log_p.exp() * (log_p - F.log_softmax(student / temperature, -1))).sum(-1)
    loss = ((1 - weight) * ce_ref + weight * temperature**2 * kl_ref).sum() * 0.25
    (grad_ref,) = torch.autograd.grad(loss, student)

    buffer = student.detach().float().clone()
    ce, kl = distillation_rows(buffer, teacher.float(), targets, weight=weight, temperature=temperature, scale=0.25)
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref.detach() if weight > 0 else torch.zeros(n, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(buffer.double(), grad_ref, rtol=1e-4, atol=1e-8)  # the gradient, in place


def test_without_a_gradient_the_logits_are_left_alone():
    student, targets = torch.randn(3, 100), torch.tensor([1, 2, 3])
    buffer = student.clone()
    ce, _ = distillation_rows(buffer, None, targets, weight=0.0, temperature=1.0, scale=1.0, write_grad=False)
    assert torch.equal(buffer, student)
    torch.testing.assert_close(ce, F.cross_entropy(student, targets, reduction="none"))


def test_a_strided_vocabulary_is_refused():
    with pytest.raises(ValueError, match="contiguous vocabulary"):
        distillation_rows(torch.randn(100, 3).t(), None, torch.zeros(3, dtype=torch.long), weight=0.0,
                          temperature=1.0, scale=1.0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weight, temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_fused_linear_loss_equals_the_pytorch_chunks(monkeypatch, dtype, tolerance, weight, temperature):
    """The whole chunked loss (3 chunks + a ragged one) with the kernel equals it without: loss, parts, and the
    gradients of the hidden states and the head; in bf16 both round the logits and the gradient the same way."""
    monkeypatch.setattr(losses, "CHUNK_POSITIONS", 4)
    torch.manual_seed(1)
    hidden = torch.randn(2, 8, 16, dtype=dtype)
    head = torch.randn(300, 16, dtype=dtype)
    teacher_hidden, teacher_head = torch.randn(2, 8, 12, dtype=dtype), torch.randn(300, 12, dtype=dtype)
    ids = torch.randint(0, 300, (2, 8))
    results = {}
    for mode in ("off", "triton"):
        monkeypatch.setenv("KVFORGE_KERNELS", mode)
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        loss, parts = losses.linear_distillation_loss_parts(h, w, ids, weight=weight, temperature=temperature,
                                                            teacher_hidden=teacher_hidden,
                                                            teacher_head_weight=teacher_head)
        results[mode] = (loss, parts, torch.autograd.grad(loss * 3.0, (h, w)))
    (loss_ref, parts_ref, grads_ref), (loss, parts, grads) = results["off"], results["triton"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert parts.keys() == parts_ref.keys()
    for name in parts:
        torch.testing.assert_close(parts[name], parts_ref[name], rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, grads_ref):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=tolerance, atol=tolerance * e.float().abs().max().item())
