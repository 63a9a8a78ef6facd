"""kvforge's static-cache sampler (trainer/sampling.py) against the model it samples from."""

import pytest
import torch

from kvforge.trainer.sampling import StaticCacheSampler, unsupported_reason


def tiny(family: str, **extra):
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, **extra)
    model = model_class(config).eval()
    if family == "qwen2":  # random biases, so a sampler that dropped them would differ
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("family, extra", [("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
                                           ("qwen2", {}), ("mistral", {"sliding_window": None})])
@pytest.mark.parametrize("attention", ["triton", "matmul", "sdpa"])
def test_prefill_and_every_decode_step_give_the_models_own_logits(family, extra, attention):
    model = tiny(family, **extra)
    tokens_BL = torch.randint(0, 97, (3, 20))
    expected_BLV = model(tokens_BL).logits
    # bucket 8: decode steps cross span boundaries (slots past the position are in the span, masked), spans 8, 16
    # and 20 (the last one cut at max_len). The Triton kernel reads all 20 slots in one block of 64, as it read 40.
    sampler = StaticCacheSampler(model, batch_size=3, max_len=20, bucket=8, attention=attention)
    prefill = sampler.forward(tokens_BL[:, :5], torch.zeros(1, dtype=torch.long), sampler._span(4))
    torch.testing.assert_close(prefill, expected_BLV[:, :5], atol=1e-5, rtol=1e-5)
    for position in range(5, 20):
        torch.testing.assert_close(sampler._decode(tokens_BL[:, position], position), expected_BLV[:, position],
                                   atol=1e-5, rtol=1e-5)


def test_sampling_matches_generate_for_a_seed_and_fills_short_batches():
    from transformers import GenerationConfig

    model = tiny("llama")
    prompt_BP = torch.randint(0, 97, (2, 4))

    def warp(scores_BV):
        return scores_BV / 0.8

    sampler = StaticCacheSampler(model, batch_size=4, max_len=24, bucket=8)  # 2 rows of a batch of 4
    torch.manual_seed(7)
    ours = sampler.sample(prompt_BP, 20, warp)
    torch.manual_seed(7)
    config = GenerationConfig(do_sample=True, max_new_tokens=20, min_new_tokens=20, temperature=0.8, top_p=1.0,
                              top_k=0, eos_token_id=[], pad_token_id=0)
    theirs = model.generate(input_ids=prompt_BP, attention_mask=torch.ones_like(prompt_BP), generation_config=config)
    assert ours.shape == (2, 24) and torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="does not fit this sampler"):
        sampler.sample(prompt_BP, 21, warp)


def test_models_it_cannot_sample_say_why():
    short_window = tiny("mistral", sliding_window=16)
    assert "sliding window of 16 tokens" in unsupported_reason(short_window, 32)
    assert unsupported_reason(short_window, 16) is None
    with pytest.raises(ValueError, match="cannot sample from this model: .*sliding window"):
        StaticCacheSampler(short_window, batch_size=1, max_len=32)
    with pytest.raises(ValueError, match="attention must be one of auto, triton, matmul, sdpa, got 'flash'"):
        StaticCacheSampler(tiny("llama"), batch_size=1, max_len=32, attention="flash")
    with pytest.raises(ValueError, match="attention 'triton' needs a head size that is a power of two >= 16"):
        StaticCacheSampler(tiny("llama", head_dim=8), batch_size=1, max_len=32, attention="triton")
    assert "is not a decoder" in unsupported_reason(torch.nn.Linear(2, 2), 8)
