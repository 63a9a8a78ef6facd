"""Where the per-head partial-RoPE recipe fails compiled on the GPU (session 9: "CUDA error: misaligned address" in
its first compiled eval, reported asynchronously; docs/results/recovery-h200/README.md, sixth runs).

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/check_partial_rope_compile.py [--layers 30 --seq-len 2048]

Each stage runs on its own and prints OK or its error, smallest first, so the first failing line names the
piece: the rotary-dims bookkeeping (`partial_rope_dims`: a scatter into bool and a stable sort of uint8) compiled
alone; then a SmolLM2-shaped model of partial-RoPE layers with greedy-like ranks (random weights, bf16), eager,
then compiled per layer (training.compile_scope=layers) in eval and in training mode, each against eager.
"""
import argparse
import traceback

import torch
from transformers import LlamaConfig

from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.modeling_kvforge import KVForgeForCausalLM, partial_rope_dims
from kvforge.trainer.runtime import compile_in_place

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=30)
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
args = parser.parse_args()
device = torch.device(args.device)


def stage(name, fn):
    try:
        detail = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"OK    {name}{': ' + detail if detail else ''}", flush=True)
        return True
    except Exception:  # noqa: BLE001 - a diagnostic: report and go on
        print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
        return False


def dims_compiled():
    rope_index = torch.tensor([[0, 1, 5, 9, 2, 3, 4, 8]] * 3, device=device)
    want = partial_rope_dims(rope_index, 64)
    got = torch.compile(partial_rope_dims)(rope_index, 64)
    assert all(torch.equal(a, b) for a, b in zip(want, got)), (want, got)


base = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                   rope_theta=100000.0, tie_word_embeddings=True)
layers = [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 16, "kv_rank": 60 + (7 * i) % 41}
          for i in range(args.layers)]
torch.manual_seed(0)
model = KVForgeForCausalLM(KVForgeConfig.from_base_config(base, {"layers": layers})).to(device, torch.bfloat16)
ids = torch.randint(0, 49152, (args.batch, args.seq_len), device=device)
eager = {}


def forward(mode):
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if mode == "train":
            logits.logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
    return logits.detach()


def compare(mode):
    got = forward(mode)
    return f"max |compiled - eager| {(got - eager[mode]).abs().max().item():.3g}"


stage("partial_rope_dims compiled alone", dims_compiled)
for mode in ("eval", "train"):
    stage(f"{args.layers} partial-RoPE layers, eager, {mode}", lambda: eager.__setitem__(mode, forward(mode)))
compile_in_place(model, "layers")
for mode in ("eval", "train"):
    stage(f"compiled per layer, {mode}", lambda: compare(mode))
