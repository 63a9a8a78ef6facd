"""Shared by the decode-kernel tests (a plain module: tests/kernels is on pytest's import path): a tiny KVForge
model's greedy generate() with and without the kernels, the dispatch rules every decode kernel follows, and the
error measure against float64 references."""

import torch

from kvforge.kernels import dispatch
from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.modeling_kvforge import KVForgeForCausalLM


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_kernel_serves_decode_only(monkeypatch, attend, args, kernel_calls):
    """The dispatch rules of every decode kernel, for `attend` (dispatch.fused_attention's answer) on one decode
    step's CPU `args`: under auto the reference serves CPU tensors; under triton the kernel serves the step with
    the reference's output, the reference serves a call asking for probabilities and a call with gradients."""
    with torch.no_grad():
        monkeypatch.setenv("KVFORGE_KERNELS", "auto")  # CPU tensors: the reference
        expected, _ = attend(*args)
        assert kernel_calls == []
        monkeypatch.setenv("KVFORGE_KERNELS", "triton")
        out, probs = attend(*args)
        assert len(kernel_calls) == 1 and probs is None
        assert relative_error(out, expected) < 1e-5
        _, probs = attend(*args, need_probs=True)  # PyramidKV's scoring asks for probabilities
        assert probs is not None and len(kernel_calls) == 1
    attend(*args)  # gradients enabled and the weights require them: training takes the reference
    assert len(kernel_calls) == 1


def tiny_model(layers, num_attention_heads=4, head_dim=16) -> KVForgeForCausalLM:
    """A tiny KVForge model of the given layer specs (2 KV heads of head_dim dims, vocabulary 128), seed 0, in eval
    mode."""
    torch.manual_seed(0)
    config = KVForgeConfig(hidden_size=64, intermediate_size=128, num_attention_heads=num_attention_heads,
                           num_key_value_heads=2, head_dim=head_dim, vocab_size=128, max_position_embeddings=256,
                           num_hidden_layers=len(layers), initializer_range=0.1, compression={"layers": layers})
    return KVForgeForCausalLM(config).eval()


def generate_with_and_without_kernels(monkeypatch, layers, num_attention_heads, head_dim=16):
    """{"off": output, "triton": output} of generate() on one tiny model of the given layer specs (2 KV heads of
    16 dims), batch 2 with 4 tokens of left padding in row 1, 10 new tokens (past a window of 8), greedy, logits
    kept."""
    model = tiny_model(layers, num_attention_heads, head_dim)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    runs = {}
    for mode in ("off", "triton"):
        monkeypatch.setenv("KVFORGE_KERNELS", mode)
        with torch.no_grad():
            runs[mode] = model.generate(ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                                        return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return runs


def assert_same_generation(runs) -> None:
    assert torch.equal(runs["triton"].sequences, runs["off"].sequences)
    for with_kernel, without in zip(runs["triton"].logits, runs["off"].logits):
        torch.testing.assert_close(with_kernel, without, atol=1e-4, rtol=1e-4)


class KernelCalls(list):
    """Each call's first argument's shape; `dtypes`: each call's cache dtype (record_kernel_calls' cache_arg)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []


def record_kernel_calls(monkeypatch, kernel: str, cache_arg: int = 1) -> KernelCalls:
    """Patches dispatch.<kernel> (the name the dispatch calls) to record each call; args[cache_arg] is a cached
    tensor, whose dtype says whether the kernel was handed a low-bit cache as it is stored."""
    calls = KernelCalls()
    real = getattr(dispatch, kernel)

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        calls.dtypes.append(args[cache_arg].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, kernel, recording)
    return calls
