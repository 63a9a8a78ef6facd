"""Passkey retrieval: can the model find a number hidden at a given depth of a long, boring context?

The classic format (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA's `passkey_retrivial.py`):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.   (x k)
    The pass key is 68235. Remember it. 68235 is the pass key.
    The grass is green. ...                                                                (x n - k)
    What is the pass key I asked you to remember? The pass key is

The filler is repeated until the whole prompt has (at most) `context_len` tokens; the key line goes
after k = round(depth * n) of the n filler units, so depth 0 puts it first and depth 1 right before the
question. The model continues greedily for a few tokens and a sample counts as correct when the first
run of digits it writes is exactly the pass key. Pass keys come from (seed, depth index, sample index), so
a run is reproducible and every depth sees different keys.

The question is LongLoRA's "What is the pass key?" with "I asked you to remember" added: asked plainly
right after the key line (depth 1), SmolLM2-135M-Instruct defines "the pass key" instead of reading it
back (1/10 correct at 4k, against 10/10 with this wording; docs/INFERENCE.md).

format="plain" is the raw text above. format="chat" puts the same text (without the answer prefix) in
the user turn of the tokenizer's chat template and opens the assistant turn with "The pass key is".

The model only has to offer `generate(input_ids=..., attention_mask=..., max_new_tokens=...,
do_sample=False, pad_token_id=..., **generate_kwargs)`; a compressed cache (e.g. PyramidKV) is chosen by
the caller through `generate_kwargs` or `cache_factory`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key I asked you to remember?"
ANSWER_PREFIX = "The pass key is"
FORMATS = ("plain", "chat")

_DIGITS = re.compile(r"\d+")


@dataclass
class PasskeyPrompt:
    input_ids: list[int]
    passkey: str
    depth: float                # requested depth in [0, 1]
    filler_units: int           # filler units in the whole haystack
    key_after_units: int        # filler units placed before the key line
    key_token_offset: int       # index of the key line's first token in input_ids (approximate for BPE merges)


@dataclass
class PasskeySample:
    depth: float
    sample: int
    passkey: str
    generated: str
    correct: bool
    prompt_tokens: int
    key_token_offset: int


@dataclass
class PasskeyResult:
    context_len: int
    format: str
    samples_per_depth: int
    seed: int
    max_new_tokens: int
    accuracy: float
    per_depth: dict[str, dict[str, float]]        # "0.25" -> {"accuracy", "correct", "samples"}
    mean_prompt_tokens: float
    elapsed_s: float
    records: list[PasskeySample] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)   # what the caller wants recorded (model, cache, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def check_format(fmt: str, tokenizer) -> None:
    """Raises ValueError for an unknown format, or `chat` with a tokenizer that has no chat template."""
    if fmt not in FORMATS:
        raise ValueError(f"passkey format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("passkey format 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use format='plain')")


def _render(tokenizer, fmt: str, haystack: str) -> str:
    """The whole prompt text for one haystack (filler with the key line already inside)."""
    if fmt == "plain":
        return f"{TASK_DESCRIPTION}\n{haystack}\n{QUESTION} {ANSWER_PREFIX}"
    messages = [{"role": "user", "content": f"{TASK_DESCRIPTION}\n\n{haystack}\n\n{QUESTION}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + ANSWER_PREFIX


def _encode(tokenizer, text: str) -> list[int]:
    # The chat template already writes any special tokens it wants; plain text gets the tokenizer's own
    # (a BOS for Llama-style tokenizers, nothing for SmolLM2's).
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _haystack(units: int, key_after: int, key_line: str) -> str:
    # As LongLoRA: filler before, the key line on its own line, filler after.
    return "\n".join([" ".join([FILLER] * key_after), key_line, " ".join([FILLER] * (units - key_after))])


def build_prompt(tokenizer, context_len: int, depth: float, passkey: str, fmt: str = "plain") -> PasskeyPrompt:
    """The longest prompt of at most `context_len` tokens with `passkey` at `depth`.

    Raises:
        ValueError: depth outside [0, 1], or a context too short for the task text, the key and one filler unit.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth}: expected a fraction in [0, 1]")
    key_line = KEY_LINE.format(key=passkey)

    def tokens_for(units: int) -> int:
        return len(_encode(tokenizer, _render(tokenizer, fmt, _haystack(units, round(depth * units), key_line))))

    fixed = tokens_for(0)
    per_unit = tokens_for(8) - tokens_for(7)
    if fixed + per_unit > context_len:
        raise ValueError(f"passkey context_len {context_len} is too short: the task text and the key alone take "
                         f"{fixed} tokens and one filler unit {per_unit} more")
    # Filler units (joined by spaces) tokenize the same every time, so this lands within a
    # token or two; walk down to be sure of the bound.
    units = (context_len - fixed) // per_unit + 1
    while units > 1 and tokens_for(units) > context_len:
        units -= 1
    key_after = round(depth * units)
    text = _render(tokenizer, fmt, _haystack(units, key_after, key_line))
    input_ids = _encode(tokenizer, text)
    prefix = text[: text.index(key_line)]
    key_token_offset = len(_encode(tokenizer, prefix))
    return PasskeyPrompt(input_ids=input_ids, passkey=passkey, depth=depth, filler_units=units,
                         key_after_units=key_after, key_token_offset=key_token_offset)


def make_passkey(seed: int, depth_index: int, sample: int, digits: int = 5) -> str:
    """A `digits`-digit key (no leading zero) drawn from (seed, depth index, sample index)."""
    rng = np.random.default_rng([seed, depth_index, sample])
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def is_correct(generated: str, passkey: str) -> bool:
    """The first run of digits the model wrote is exactly the pass key (no extra or missing digits)."""
    found = _DIGITS.search(generated)
    return found is not None and found.group(0) == passkey


@torch.no_grad()
def evaluate_passkey(
    model,
    tokenizer,
    *,
    context_len: int,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 4,
    seed: int = 0,
    fmt: str = "plain",
    digits: int = 5,
    max_new_tokens: int = 8,
    generate_kwargs: Optional[dict] = None,
    cache_factory: Optional[Callable[[], Any]] = None,
    progress: Optional[Callable[[PasskeySample], None]] = None,
) -> PasskeyResult:
    """Passkey accuracy per depth; one prompt at a time (batch 1, no padding), greedy decoding.

    A prompt holds at most `context_len - max_new_tokens` tokens, so the prompt and the answer fit in
    `context_len` positions: at `context_len` = max_position_embeddings the answer would otherwise be written at
    positions the model was never trained on. (On the H200, SmolLM2 with 8,192-token prompts failed every depth-0
    prompt, the original included, answering past that limit; whether the positions were the cause is not measured.)

    `cache_factory()` (if given) builds a fresh `past_key_values` for every prompt: the way to evaluate
    a model with a compressed cache. `generate_kwargs` go to every `generate` call.

    Raises:
        ValueError: an empty depth list, samples < 1, a bad depth or format, or a context longer than
            the model's `max_position_embeddings`.
    """
    if not depths:
        raise ValueError("passkey depths: expected at least one depth in [0, 1]")
    if samples < 1:
        raise ValueError(f"passkey samples {samples}: expected at least 1 per depth")
    if max_new_tokens < digits:
        raise ValueError(f"passkey max_new_tokens {max_new_tokens}: expected at least the {digits} digits of the key")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_len > limit:
        raise ValueError(f"passkey context_len {context_len} is longer than the model's max_position_embeddings "
                         f"({limit})")
    check_format(fmt, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    records: list[PasskeySample] = []
    for depth_index, depth in enumerate(depths):
        for sample in range(samples):
            passkey = make_passkey(seed, depth_index, sample, digits)
            prompt = build_prompt(tokenizer, context_len - max_new_tokens, float(depth), passkey, fmt)
            input_ids = torch.tensor([prompt.input_ids], device=device)
            kwargs = dict(generate_kwargs or {})
            if cache_factory is not None:
                from kvforge.models.modeling_kvforge import CACHE_ARGUMENT

                kwargs[CACHE_ARGUMENT] = cache_factory()
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id, **kwargs)
            generated = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
            record = PasskeySample(depth=float(depth), sample=sample, passkey=passkey, generated=generated,
                                   correct=is_correct(generated, passkey), prompt_tokens=len(prompt.input_ids),
                                   key_token_offset=prompt.key_token_offset)
            records.append(record)
            if progress is not None:
                progress(record)
    model.train(was_training)

    per_depth = {}
    for depth in depths:
        rows = [r for r in records if r.depth == float(depth)]
        correct = sum(r.correct for r in rows)
        per_depth[f"{float(depth):g}"] = {"accuracy": correct / len(rows), "correct": correct, "samples": len(rows)}
    return PasskeyResult(
        context_len=context_len, format=fmt, samples_per_depth=samples, seed=seed, max_new_tokens=max_new_tokens,
        accuracy=sum(r.correct for r in records) / len(records), per_depth=per_depth,
        mean_prompt_tokens=float(np.mean([r.prompt_tokens for r in records])),
        elapsed_s=time.perf_counter() - started, records=records,
    )


def parse_depths(text: str) -> list[float]:
    """`"0,0.25,0.5"` -> [0.0, 0.25, 0.5]; raises ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"passkey depth {item!r} in {text!r}: expected numbers in [0, 1] separated by "
                             "commas") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"passkey depth {value} in {text!r}: expected a fraction in [0, 1]")
        out.append(value)
    return out


__all__ = ["PasskeyPrompt", "PasskeySample", "PasskeyResult", "build_prompt", "make_passkey", "is_correct",
           "evaluate_passkey", "parse_depths", "check_format"]
