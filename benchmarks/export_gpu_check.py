"""An exported directory on a GPU, loaded by plain transformers (kvforge absent): does generate() run the bundled
Triton kernel, and give the tokens the PyTorch path gives?

  python benchmarks/export_gpu_check.py build DIR     # here, with kvforge: a small random latent model, exported
  python benchmarks/export_gpu_check.py check DIR     # on the GPU machine, without kvforge on the path
"""
import sys


def build(out: str) -> None:
    import torch

    from kvforge.models.configuration_kvforge import KVForgeConfig
    from kvforge.models.export import export_model
    from kvforge.models.loading import load_tokenizer
    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    low_rank = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 48, "v_rank": 144}
    layers = [low_rank, {"kv_from": 0}, {**low_rank, "attention": "window", "window": 64, "sinks": 4}, low_rank]
    torch.manual_seed(0)
    config = KVForgeConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                           tie_word_embeddings=True, initializer_range=0.2, compression={"layers": layers})
    model = KVForgeForCausalLM(config).eval()
    export_model(model, load_tokenizer("smollm2-135m-instruct"), out, dtype="bfloat16", overwrite=True,
                 measure_tokens=128)


def check(directory: str) -> None:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    assert not any(m == "kvforge" or m.startswith("kvforge.") for m in sys.modules)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype).cuda().eval()
        modeling = sys.modules[type(model).__module__]
        dispatch = sys.modules[modeling.fused_attention.__module__]
        calls = []
        kernel = getattr(dispatch, "_uncounted", dispatch.latent_decode_attention)
        dispatch._uncounted = kernel

        def counting(*args, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        dispatch.latent_decode_attention = counting
        ids = torch.randint(3, 49152, (8, 1000), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :100] = 0  # left padding in one row
        out = {}
        for mode in ("off", "off again", "auto"):
            os.environ["KVFORGE_KERNELS"] = mode.split()[0]
            with torch.no_grad():
                out[mode] = model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                                           do_sample=False, pad_token_id=0, output_logits=True,
                                           return_dict_in_generate=True)

        def compare(a, b):
            new = slice(ids.shape[1], None)
            same = (out[a].sequences[:, new] == out[b].sequences[:, new]).float().mean().item()
            diffs = [((x.float() - y.float()).norm() / x.float().norm()).item()
                     for x, y in zip(out[a].logits[:4], out[b].logits[:4])]
            return f"new tokens equal {same:.3f}, logits steps 0-3 relative difference " + \
                " ".join(f"{d:.1e}" for d in diffs)

        print(f"{dtype}: kernel calls {len(calls)} (39 decode steps x 4 layers reading latents = 156)")
        print(f"  off vs off again: {compare('off', 'off again')}")
        print(f"  off vs kernel:    {compare('off', 'auto')}")


if __name__ == "__main__":
    {"build": build, "check": check}[sys.argv[1]](sys.argv[2])
