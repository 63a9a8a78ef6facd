"""Where a decode step's time goes through generate(): torch.profiler over a few steps of the lr50 SmolLM2-shaped
model, kernels on and off (random bf16 weights, B x 4096-token prompt)."""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.argv = [sys.argv[0]]
sys.path.insert(0, "launch")
from benchmark_decode import LR50_SPEC, SMOLLM2  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from kvforge.models.configuration_kvforge import KVForgeConfig  # noqa: E402
from kvforge.models.modeling_kvforge import KVForgeCache, KVForgeForCausalLM  # noqa: E402

base = LlamaConfig(**SMOLLM2)
config = KVForgeConfig.from_base_config(base, json.loads(LR50_SPEC.read_text())["spec"])
config._attn_implementation = "sdpa"
model = KVForgeForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
batch = int(os.environ.get("BATCH", "32"))
ids = torch.randint(3, base.vocab_size, (batch, 4096), device="cuda")
for mode in ("auto", "off"):
    os.environ["KVFORGE_KERNELS"] = mode
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = KVForgeCache(config, max_cache_len=4096 + 16)
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    print(f"== KVFORGE_KERNELS={mode} B={batch}: 5 decode steps (model forward only)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
