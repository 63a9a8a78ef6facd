import sys, torch
from kvforge.models.loading import load_pretrained
import kvforge.trainer.passkey as P
m, tok = load_pretrained('/tmp/SmolLM2-135M-Instruct.Q4_1.gguf', dtype='bfloat16', device='cuda')
variants = {
 'cur': ("What is the pass key?", "The pass key is"),
 'digits': ("What is the pass key (a five-digit number)?", "The pass key is"),
 'qa': ("Question: What is the pass key? Answer:", "The pass key is"),
 'remember': ("What is the pass key I asked you to remember?", "The pass key is"),
 'number': ("What is the pass key?", "The pass key is the number"),
}
for ctx in (2048, 4096):
    for name, (q, a) in variants.items():
        P.QUESTION, P.ANSWER_PREFIX = q, a
        r = P.evaluate_passkey(m, tok, context_len=ctx, samples=10, depths=[0.0, 0.5, 0.9, 1.0])
        print(ctx, name, {k: v['correct'] for k, v in r.per_depth.items()}, [x.generated for x in r.records if not x.correct][:2], flush=True)
