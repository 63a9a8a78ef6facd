import pytest
import torch
import torch.nn.functional as F

from kvforge.trainer import losses
from kvforge.trainer.losses import distillation_loss


def test_weight_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    got = distillation_loss(logits, torch.randn(2, 7, 11), ids, weight=0.0)
    torch.testing.assert_close(got, expected)


def test_distillation_matches_the_textbook_formula_in_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_POSITIONS", 3)  # 12 positions -> 4 chunks
    torch.manual_seed(0)
    student, teacher, ids = torch.randn(2, 7, 11), torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    T, w = 2.0, 0.3
    s, t = student[:, :-1].reshape(-1, 11), teacher[:, :-1].reshape(-1, 11)
    kl = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    got = distillation_loss(student, teacher, ids, weight=w, temperature=T)
    torch.testing.assert_close(got, (1 - w) * ce + w * T**2 * kl)


def test_identical_teacher_gives_zero_kl_and_a_gradient_only_through_the_student():
    student = torch.randn(1, 5, 7, requires_grad=True)
    loss = distillation_loss(student, student.detach().clone(), torch.zeros(1, 5, dtype=torch.long), weight=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert student.grad is not None


def test_mismatched_vocabularies_are_reported():
    with pytest.raises(ValueError, match=r"student logits \(1, 4, 5\) and teacher logits \(1, 4, 6\)"):
        distillation_loss(torch.zeros(1, 4, 5), torch.zeros(1, 4, 6), torch.zeros(1, 4, dtype=torch.long), weight=0.5)


@pytest.mark.parametrize("weight, temperature", [(0.0, 1.0), (0.3, 2.0), (1.0, 1.0)])
def test_linear_loss_equals_the_logits_loss_with_the_same_gradients(monkeypatch, weight, temperature):
    """From hidden states and the head weight, chunk by chunk (3 chunks + a ragged one), against autograd
    through the full logits: same loss, same gradients for the hidden states and the (student) head."""
    monkeypatch.setattr(losses, "CHUNK_POSITIONS", 4)
    torch.manual_seed(1)
    hidden = torch.randn(2, 8, 6, dtype=torch.float64, requires_grad=True)
    head = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(2, 8, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    ids = torch.randint(0, 13, (2, 8))
    expected = distillation_loss(hidden @ head.t(), teacher_hidden @ teacher_head.t(), ids, weight=weight,
                                 temperature=temperature)
    expected_grads = torch.autograd.grad(expected * 3.0, (hidden, head))  # an upstream scale reaches both
    got = losses.linear_distillation_loss(hidden, head, ids, weight=weight, temperature=temperature,
                                          teacher_hidden=teacher_hidden, teacher_head_weight=teacher_head)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(got * 3.0, (hidden, head)), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)  # both do the softmax work in fp32


def test_linear_loss_needs_the_teacher_for_distillation_and_a_shared_vocabulary():
    hidden, head, ids = torch.zeros(1, 4, 3), torch.zeros(5, 3), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="distillation weight 0.5 needs the teacher's hidden states"):
        losses.linear_distillation_loss(hidden, head, ids, weight=0.5)
    with pytest.raises(ValueError, match="student vocabulary 5 and teacher vocabulary 6 differ"):
        losses.linear_distillation_loss(hidden, head, ids, weight=0.5, teacher_hidden=hidden,
                                        teacher_head_weight=torch.zeros(6, 3))


def textbook_kd(hidden, head, teacher_hidden, teacher_head, ids, weight, temperature):
    """(1 - w) CE + w T^2 KL(softmax(t / T) || softmax(s / T)) through autograd in float64, per predicted token."""
    s, t = (hidden @ head.t())[:, :-1].reshape(-1, head.shape[0]), (teacher_hidden @ teacher_head.t())[:, :-1]
    t = t.reshape(-1, head.shape[0])
    p = F.softmax(t / temperature, -1)
    kl = (p * (F.log_softmax(t / temperature, -1) - F.log_softmax(s / temperature, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    return (1 - weight) * ce + weight * temperature**2 * kl, ce, kl


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature_in_both_paths_matches_the_textbook_loss_value_parts_and_gradients(monkeypatch, temperature):
    monkeypatch.setattr(losses, "CHUNK_POSITIONS", 5)  # 14 positions -> 3 chunks, a ragged one
    torch.manual_seed(2)
    hidden = torch.randn(2, 8, 6, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(2, 8, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 8))
    w = 0.7
    expected, ce, kl = textbook_kd(hidden, head, teacher_hidden, teacher_head, ids, w, temperature)
    expected_grads = torch.autograd.grad(expected, (hidden, head))
    linear, linear_parts = losses.linear_distillation_loss_parts(
        hidden, head, ids, weight=w, temperature=temperature, teacher_hidden=teacher_hidden,
        teacher_head_weight=teacher_head)
    logits, logits_parts = losses.distillation_loss_parts(hidden @ head.t(), teacher_hidden @ teacher_head.t(), ids,
                                                          weight=w, temperature=temperature)
    for got, parts in ((linear, linear_parts), (logits, logits_parts)):
        torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(parts["ce"], ce.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(parts["kl"], kl.float(), rtol=1e-6, atol=1e-6)
        assert not parts["ce"].requires_grad and not parts["kl"].requires_grad
        for g, e in zip(torch.autograd.grad(got, (hidden, head)), expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_identical_student_and_teacher_give_zero_distillation_and_no_kl_gradient_in_the_hidden_path():
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 5, requires_grad=True)
    head = torch.randn(9, 5, requires_grad=True)
    ids = torch.randint(0, 9, (2, 6))
    for temperature in (1.0, 3.0):
        loss, parts = losses.linear_distillation_loss_parts(
            hidden, head, ids, weight=1.0, temperature=temperature, teacher_hidden=hidden.detach().clone(),
            teacher_head_weight=head.detach().clone())
        assert loss.item() == pytest.approx(0.0, abs=1e-6) and parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
        assert parts["ce"].item() > 0  # logged although weight 1 leaves it out of the loss
        for grad in torch.autograd.grad(loss, (hidden, head)):
            assert grad.abs().max().item() < 1e-6


def test_cross_entropy_alone_has_only_the_ce_part():
    torch.manual_seed(4)
    hidden, head, ids = torch.randn(1, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (1, 5))
    loss, parts = losses.linear_distillation_loss_parts(hidden, head, ids, weight=0.0)
    assert set(parts) == {"ce"} and parts["ce"].item() == pytest.approx(loss.item())
