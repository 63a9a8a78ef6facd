"""Passkey retrieval: prompt construction (length, depth, format), scoring, the evaluation loop with a
stand-in model that reads the prompt, the launch/evaluate.py task end to end on a tiny model, and the real
SmolLM2 (marked real_model)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvforge.trainer.passkey import (
    ANSWER_PREFIX,
    KEY_LINE,
    QUESTION,
    build_prompt,
    evaluate_passkey,
    is_correct,
    make_passkey,
    parse_depths,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    from kvforge.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize("context_len", [256, 1000, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_fills_the_context_and_puts_the_key_at_its_depth(tokenizer, context_len, depth):
    p = build_prompt(tokenizer, context_len, depth, "48213", fmt="plain")
    assert context_len - 30 < len(p.input_ids) <= context_len  # within about one filler unit of the target
    text = tokenizer.decode(p.input_ids)
    assert text.count("48213") == 2 and text.count(KEY_LINE.format(key="48213")) == 1
    assert text.endswith(f"{QUESTION} {ANSWER_PREFIX}")
    assert p.key_after_units == round(depth * p.filler_units)
    before = text[: text.index("The pass key is 48213")]
    assert before.count("The grass is green.") == p.key_after_units  # the depth, counted in filler units
    relative = p.key_token_offset / len(p.input_ids)
    assert abs(relative - depth) < 0.05 + 60 / context_len  # that fraction of the tokens, up to the task text


def test_chat_format_uses_the_template_and_opens_the_answer(tokenizer):
    p = build_prompt(tokenizer, 512, 0.5, "12345", fmt="chat")
    text = tokenizer.decode(p.input_ids)
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant\n" + ANSWER_PREFIX in text
    assert len(p.input_ids) <= 512


def test_prompt_errors_name_the_value(tokenizer):
    with pytest.raises(ValueError, match="context_len 40 is too short"):
        build_prompt(tokenizer, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth 1.5: expected a fraction in"):
        build_prompt(tokenizer, 512, 1.5, "12345")
    with pytest.raises(ValueError, match="format 'jinja'"):
        evaluate_passkey(_Oracle(tokenizer), tokenizer, context_len=256, depths=[0.5], samples=1, fmt="jinja")


def test_passkeys_are_fixed_by_the_seed_and_differ_across_prompts():
    keys = [make_passkey(0, d, s) for d in range(5) for s in range(4)]
    assert keys == [make_passkey(0, d, s) for d in range(5) for s in range(4)]
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert make_passkey(1, 0, 0) != make_passkey(0, 0, 0)
    assert len(make_passkey(0, 0, 0, digits=7)) == 7


@pytest.mark.parametrize("generated,correct", [
    (" 48213.", True), (" 48213 is the pass key", True), ("\nThe pass key is 48213", True),
    (" 482135", False), (" 4821", False), (" a special key that is used", False), (" 48 213", False),
])
def test_scoring_wants_exactly_the_digits(generated, correct):
    assert is_correct(generated, "48213") is correct


def test_parse_depths():
    assert parse_depths("0, 0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="depth 'x'"):
        parse_depths("0,x")
    with pytest.raises(ValueError, match="depth 2.0 in"):
        parse_depths("0,2")


class _Oracle(torch.nn.Module):
    """Answers with the first 5-digit number of the prompt (or a wrong one): a stand-in that checks the
    loop, the decoding of the answer and the bookkeeping, not a language model."""

    def __init__(self, tokenizer, wrong=False):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong
        self.config = type("Config", (), {"max_position_embeddings": 8192})()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.caches = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, **cache):
        from kvforge.models.modeling_kvforge import CACHE_ARGUMENT

        # The cache arrives under the installed transformers' name (`cache` from 5.24, `past_key_values` before).
        assert input_ids.shape[0] == 1 and not do_sample and attention_mask.all() and set(cache) <= {CACHE_ARGUMENT}
        self.caches.append(cache.get(CACHE_ARGUMENT))
        key = re.search(r"\d{5}", self.tokenizer.decode(input_ids[0])).group(0)
        answer = " " + (str(int(key) + 1) if self.wrong else key) + "."
        ids = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, ids[:, :max_new_tokens]], dim=1)


def test_evaluation_counts_per_depth_and_builds_a_cache_per_prompt(tokenizer):
    oracle = _Oracle(tokenizer)
    made = []
    result = evaluate_passkey(oracle, tokenizer, context_len=300, depths=[0, 0.5, 1], samples=2, seed=3,
                              cache_factory=lambda: made.append(object()) or made[-1])
    assert result.accuracy == 1.0 and set(result.per_depth) == {"0", "0.5", "1"}
    assert all(v == {"accuracy": 1.0, "correct": 2, "samples": 2} for v in result.per_depth.values())
    assert oracle.caches == made and len(made) == 6  # a fresh cache for every prompt
    assert [r.passkey for r in result.records] == [make_passkey(3, d, s) for d in range(3) for s in range(2)]
    json.dumps(result.to_dict())  # the --json output
    # Prompt and answer fit the context: the longest prompt leaves max_new_tokens positions.
    assert all(300 - 8 - 30 < r.prompt_tokens <= 300 - 8 for r in result.records)

    wrong = evaluate_passkey(_Oracle(tokenizer, wrong=True), tokenizer, context_len=300, depths=[0.5], samples=3)
    assert wrong.accuracy == 0.0 and wrong.per_depth["0.5"]["correct"] == 0


def test_context_longer_than_the_model_is_refused(tokenizer):
    oracle = _Oracle(tokenizer)
    oracle.config.max_position_embeddings = 1024
    with pytest.raises(ValueError, match="context_len 2048 is longer than the model's max_position_embeddings"):
        evaluate_passkey(oracle, tokenizer, context_len=2048)


def test_evaluate_cli_runs_passkey_with_pyramidkv_on_a_tiny_model(tmp_path, tokenizer):
    """launch/evaluate.py --task passkey on a tiny random Llama (converted to all-dense KVForge for PyramidKV)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=1024))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "passkey.json"
    cmd = [sys.executable, str(REPO / "launch/evaluate.py"), "--task", "passkey", "--model", str(tmp_path / "tiny"),
           "--context-len", "200", "--depths", "0,1", "--samples", "1", "--pyramid-budget", "32",
           "--pyramid-schedule", "uniform", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["task"] == "passkey" and payload["context_len"] == 200 and len(payload["records"]) == 2
    assert payload["cache"]["settings"]["budget"] == 32 and payload["cache"]["kept"] == {"0": 32, "1": 32}

    bad = subprocess.run(cmd[:-2] + ["--pyramid-budget", "5"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert bad.returncode == 2 and "pyramid.budget=5 is smaller than window + sinks" in bad.stderr


@pytest.mark.real_model
def test_original_smollm2_finds_the_key_at_2k(smollm2_dir):
    """The format is right when the uncompressed model (full cache) finds the key (docs/INFERENCE.md has
    the full 2k / 4k tables; this samples three depths)."""
    from kvforge.models.loading import load_pretrained

    torch.set_num_threads(2)
    model, tokenizer = load_pretrained(str(smollm2_dir), dtype="bfloat16")
    result = evaluate_passkey(model, tokenizer, context_len=2048, depths=[0.0, 0.5, 1.0], samples=1)
    assert result.accuracy == 1.0, [(r.depth, r.passkey, r.generated) for r in result.records]


def test_evaluate_cli_applies_an_exported_default_unless_told_to_keep_the_full_cache(tmp_path, tokenizer):
    """A KVForge model whose config holds a PyramidKV default: evaluate applies it, --full-cache keeps every
    token, and --full-cache with --pyramid-* options is refused naming them."""
    from kvforge.models.configuration_kvforge import KVForgeConfig
    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    torch.manual_seed(0)
    config = KVForgeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                           compression={"layers": [{}, {}], "inference": {"pyramid": {"budget": 24}}})
    KVForgeForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    cmd = [sys.executable, str(REPO / "launch/evaluate.py"), "--task", "passkey", "--model", str(tmp_path / "tiny"),
           "--context-len", "200", "--depths", "0", "--samples", "1"]
    caches = {}
    for name, extra in (("default", []), ("full", ["--full-cache"])):
        out = tmp_path / f"{name}.json"
        result = subprocess.run(cmd + extra + ["--json", str(out)], capture_output=True, text=True, timeout=600,
                                cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        caches[name] = json.loads(out.read_text())["cache"]
    kept = caches["default"]["kept"]  # the default's pyramid: budgets decreasing with depth, mean 24
    assert kept["0"] > kept["1"] and kept["0"] + kept["1"] == 48 and caches["full"] == {"pyramid": None}
    bad = subprocess.run(cmd + ["--full-cache", "--pyramid-sinks", "2"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--full-cache keeps every token: drop --pyramid-sinks" in bad.stderr
