"""A seeded fuzz over the config schema: every bad input ends in one ConfigError that names the key.

Cases are drawn from the schema itself (trainer/config.py's dataclasses), so a new field is fuzzed
without editing this file: a wrong type for each leaf, a one-letter misspelling of each key (which
must come back with "did you mean" and the intended key), and out-of-range numbers (negative, zero,
huge, NaN, inf), given either as a `key=value` override or inside a YAML file. A case may be
accepted only if what was accepted is sane (finite, non-negative, an int below 2**63); anything else must
be a ConfigError with a one-line message naming the key, never an exception from inside OmegaConf,
YAML or the trainer. All of it runs in-process in a few seconds: no model is ever involved.
"""

import difflib
import math
import random
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from kvforge.trainer.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs/tiny-llama.yaml"
SEED = 20240611
N_CASES = 300


def schema_leaves(cls=Config, prefix=""):
    """(dotted key, type hint) of every leaf of the schema."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if is_dataclass(hint):
            yield from schema_leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint


def schema_keys(cls=Config, prefix=""):
    """(dotted key, names of its siblings) of every key: sections and leaves."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for name in names:
        yield f"{prefix}{name}", names
        if is_dataclass(hints[name]):
            yield from schema_keys(hints[name], f"{prefix}{name}.")


def kind(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint in (bool, int, float, str):
        return hint.__name__
    origin = typing.get_origin(hint)
    return {list: "list", dict: "dict"}.get(origin, "any")


WRONG_TYPES = {
    "int": ["abc", 1.5, [1, 2], {"a": 1}, True],
    "float": ["abc", [1.0], {"a": 1}],
    "bool": [2, "maybe", [True], {"a": 1}, 0.5],
    "str": [[1, 2], {"a": 1}],
    "list": ["q_proj", 5, {"a": 1}, [[1]], [{"a": 1}]],
    "dict": [5, "abc", [1, 2], True],
    "any": [5, True, [1, 2], "no/such/file.json"],
}
OUT_OF_RANGE = {
    "int": [-1, 0, -(2**40), 2**70],
    "float": [-1.0, 0.0, -1e30, 1e30, float("nan"), float("inf"), float("-inf")],
}


def misspell(word: str, rng: random.Random) -> str:
    """One edit: delete, swap two neighbours, replace or insert a letter."""
    i = rng.randrange(len(word))
    letters = "abcdefghijklmnopqrstuvwxyz_"
    op = rng.choice(["delete", "swap", "replace", "insert"])
    if op == "delete":
        return word[:i] + word[i + 1:]
    if op == "swap" and i + 1 < len(word) and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "insert":
        return word[:i] + rng.choice(letters) + word[i:]
    return word[:i] + rng.choice([c for c in letters if c != word[i]]) + word[i + 1:]


def yaml_scalar(value) -> str:
    """`value` as YAML flow text for a `key=value` override (nan -> .nan, 1e30 -> 1.0e+30)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def build_cases():
    rng = random.Random(SEED)
    cases = []  # (label, key named in the error, {key: value} or misspelt key, expected suggestion)
    for key, hint in schema_leaves():
        for value in WRONG_TYPES[kind(hint)]:
            cases.append(("wrong type", key, value, None))
        for value in OUT_OF_RANGE.get(kind(hint), []):
            cases.append(("out of range", key, value, None))
    for key, siblings in schema_keys():
        *parents, name = key.split(".")
        if len(name) < 4:  # a one-letter edit of "r" or "eps" leaves nothing to match against
            continue
        for _ in range(3):
            wrong = misspell(name, rng)
            if wrong not in siblings:
                cases.append(("misspelt", ".".join([*parents, wrong]), 1, key))
    rng.shuffle(cases)
    return cases[:N_CASES]


CASES = build_cases()


def accepted_value_is_sane(cfg: Config, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return True
    if isinstance(node, int):
        return 0 <= node < 2**63
    return math.isfinite(node) and node >= 0


def test_the_fuzz_covers_the_schema():
    labels = {label for label, *_ in CASES}
    assert labels == {"wrong type", "out of range", "misspelt"}
    assert len({key for _, key, *_ in CASES}) > 40, "too few distinct keys fuzzed"


@pytest.mark.parametrize("index", range(len(CASES)))
def test_fuzzed_config_fails_cleanly_naming_the_key(index, tmp_path):
    label, key, value, suggestion = CASES[index]
    via_file = index % 2 == 0
    if via_file:
        path = tmp_path / "fuzz.yaml"
        config = yaml.safe_load(BASE.read_text())  # the fuzzed key goes into a copy of the shipped config
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        path.write_text(yaml.safe_dump(config))
        args = (path, [])
    else:
        args = (BASE, [f"{key}={yaml_scalar(value)}"])
    try:
        cfg = load_config(*args)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message, message
        assert f"'{key}'" in message, (label, key, value, message)
        if suggestion is not None:
            suggested = message.split("did you mean '")[1].split("'")[0] if "did you mean '" in message else None
            assert suggested is not None, (key, message)
            # The intended key, or a sibling at least as close to what was typed.
            typed = key.rsplit(".", 1)[-1]
            ratio = lambda k: difflib.SequenceMatcher(None, typed, k.rsplit(".", 1)[-1]).ratio()  # noqa: E731
            assert suggested == suggestion or ratio(suggested) >= ratio(suggestion), (key, suggestion, message)
        return
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label} {key}={value!r} raised {type(err).__name__} instead of ConfigError: {err}")
    assert label == "out of range", f"{label} {key}={value!r} was accepted"
    assert accepted_value_is_sane(cfg, key), f"{key}={value!r} was accepted"
