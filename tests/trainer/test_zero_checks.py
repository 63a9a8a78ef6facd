"""ZeRO-1/2's gradient checks fused over all tensors (trainer/zero_checks.py): the same answers as DeepSpeed's
per-tensor methods, the same training, the same skipped step on a NaN, and DeepSpeed's method back when they
disagree."""

import copy

import pytest
import torch
from ports import free_port

from kvforge.trainer import zero_checks
from kvforge.trainer.zero_checks import any_non_finite, fuse_gradient_checks, l2_norms, self_test

deepspeed = pytest.importorskip("deepspeed")


def test_non_finite_values_are_found_in_any_tensor_and_only_those():
    finite = [torch.tensor([1.0, -3.0e38]), torch.zeros(0), torch.randn(7, 5, dtype=torch.bfloat16)]
    assert not any_non_finite(finite) and not any_non_finite([]) and not any_non_finite([torch.zeros(0)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = torch.randn(300)
        poisoned[123] = bad
        assert any_non_finite([*finite, poisoned]).tolist() == [True], bad
    assert self_test(torch.device("cpu")) is None


def test_norms_are_float64_sums_of_float32_accumulations():
    tensors = [torch.randn(1000, 3), torch.randn(17, dtype=torch.bfloat16)]
    expected = torch.stack([t.double().norm() for t in tensors])
    torch.testing.assert_close(l2_norms(tensors), expected, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def world_of_one():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield  # conftest's pytest_sessionfinish ends the process group


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16),
                               torch.nn.LayerNorm(16), torch.nn.Linear(16, 3, bias=False))


def engine_for(model, fused: bool, log=print):
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.05, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if fused:
        assert fuse_gradient_checks(engine.optimizer, log)
    return engine


def train(engine, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        engine.backward(engine(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean())
        engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def test_fused_checks_train_as_deepspeeds_own_and_skip_a_nan_step(world_of_one):
    model, messages = tiny_model(), []
    plain, fused = engine_for(copy.deepcopy(model), fused=False), engine_for(model, fused=True, log=messages.append)
    for engine in (plain, fused):
        train(engine, 3)
    # The gradient norm (clipped at 0.05, so it decides every update) agrees to float rounding.
    norms = float(plain.get_global_grad_norm()), float(fused.get_global_grad_norm())
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    for name, value in weights(plain).items():
        torch.testing.assert_close(weights(fused)[name], value, rtol=1e-2, atol=1e-3, msg=name)
    # After the first call verified them, the fused methods stay.
    assert "has_overflow_partitioned_grads_serial" in vars(fused.optimizer)
    assert "get_grad_norm_direct" in vars(fused.optimizer)
    # Between backward and step, as DeepSpeed calls it: a clean step has no overflow, a NaN one has.
    for poisoned in (False, True):
        before = weights(fused)
        loss = fused(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean()
        fused.backward(loss * float("nan") if poisoned else loss)
        assert fused.optimizer.has_overflow_partitioned_grads_serial().tolist() == [poisoned]
        fused.step()
    assert fused.skipped_steps == 1 and messages == []
    for name, value in before.items():
        assert torch.equal(weights(fused)[name], value), name


def test_a_fused_check_that_disagrees_gives_deepspeeds_method_back(world_of_one, monkeypatch):
    messages = []
    real = zero_checks._fused_grad_norm
    monkeypatch.setattr(zero_checks, "_fused_grad_norm", lambda self, *args, **kw: real(self, *args, **kw) * 2)
    engine = engine_for(tiny_model(), fused=True, log=messages.append)
    reference = engine_for(tiny_model(), fused=False)
    train(engine, 2)
    train(reference, 2)
    assert len(messages) == 1 and messages[0].startswith("fused gradient checks: get_grad_norm_direct gave ")
    assert messages[0].endswith("DeepSpeed's method from here on")
    assert "get_grad_norm_direct" not in vars(engine.optimizer)  # the class's method again
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(reference.get_global_grad_norm()), rel=1e-6)


def test_only_zero_1_and_2_get_fused_checks(world_of_one):
    config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
              "steps_per_print": 10 ** 9}
    model = tiny_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    assert not fuse_gradient_checks(engine.optimizer)


def test_a_failing_self_test_leaves_deepspeeds_methods_and_says_why(world_of_one, monkeypatch):
    def refuses(device):
        raise RuntimeError("_foreach_norm: no such overload")

    monkeypatch.setattr(zero_checks, "self_test", refuses)
    messages = []
    model = tiny_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
        "steps_per_print": 10 ** 9})
    assert not fuse_gradient_checks(engine.optimizer, messages.append)
    assert messages == ["fused gradient checks: off, RuntimeError: _foreach_norm: no such overload on cpu"]
    assert "get_grad_norm_direct" not in vars(engine.optimizer)
