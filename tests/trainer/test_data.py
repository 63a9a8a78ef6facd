"""trainer/data.py: every source kind, bad data, the split, packing, the cache, and rank batches.

A tiny byte-level BPE tokenizer trained here stands in for the real one, so no test needs the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from kvforge.trainer import data
from kvforge.trainer.data import DataError, Document

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the sum of the values in the list.",
    "def square(x):\n    return x * x\n",
    "Documents are packed into rows of exactly seq_len tokens.",
]
EOS = 0  # "<eos>" is the tokenizer's first special token


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    assert tok.eos_token_id == EOS
    return tok


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def make_corpus(folder, n: int = 12, words: int = 40) -> str:
    """n text files whose texts are unique (doc<i> markers) and long enough for a few rows each."""
    for i in range(n):
        write(folder / f"doc{i:02d}.txt", f"doc{i:02d} " + " ".join(SENTENCES[i % 4].split()[:6]) * (words // 6))
    return str(folder)


def settings(source, tmp_path, **overrides):
    return {"source": source, "seq_len": 16, "eval_fraction": 0.25, "cache_dir": str(tmp_path / "cache"),
            **overrides}


# ----------------------------------------------------------------------------------------------------
# Sources


def test_folder_of_text_files_is_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b.md", "# Bee\nmarkdown")
    write(tmp_path / "a.txt", "plain text")
    write(tmp_path / "sub" / "c.rst", "Title\n=====\nrest")
    write(tmp_path / "sub" / "d.rst.txt", "a python-docs style file")
    write(tmp_path / ".hidden.txt", "never read")
    write(tmp_path / ".git" / "x.txt", "never read")
    write(tmp_path / "image.png", b"\x89PNG")
    docs = data.load_documents(str(tmp_path))
    assert docs == [Document("a.txt", "plain text"), Document("b.md", "# Bee\nmarkdown"),
                    Document("sub/c.rst", "Title\n=====\nrest"), Document("sub/d.rst.txt", "a python-docs style file")]
    # A single file is a source too; its id is its name.
    assert data.load_documents(str(tmp_path / "sub" / "c.rst")) == [Document("c.rst", "Title\n=====\nrest")]


def test_jsonl_json_and_parquet_give_one_document_per_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "rows.jsonl", '{"text": "first"}\n\n{"text": "third line", "other": 1}\n')
    write(tmp_path / "array.json", json.dumps([{"body": "a"}, {"body": "b"}]))
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"], "n": [1, 2, 3]}), tmp_path / "table.parquet")

    assert data.load_documents(str(tmp_path / "rows.jsonl")) == [
        Document("rows.jsonl:1", "first"), Document("rows.jsonl:3", "third line")]  # ids are line numbers
    assert [d.id for d in data.load_documents(str(tmp_path / "array.json"), text_field="body")] == [
        "array.json:1", "array.json:2"]
    parquet = data.load_documents(str(tmp_path / "table.parquet"), text_field="body")
    assert [(d.id, d.text) for d in parquet] == [("table.parquet:1", "p1"), ("table.parquet:2", "p2"),
                                                 ("table.parquet:3", "p3")]
    # JSON Lines saved under a .json name also works.
    write(tmp_path / "lines.json", '{"text": "x"}\n{"text": "y"}\n')
    assert [d.text for d in data.load_documents(str(tmp_path / "lines.json"))] == ["x", "y"]


@pytest.mark.skipif(not data.PYTHON_DOCS_DIR.is_dir(), reason="python3.11-doc is not installed")
def test_python_docs_are_the_rst_sources_one_per_file():
    docs = data.load_documents("python-docs")
    assert len(docs) > 400
    by_id = {d.id: d.text for d in docs}
    assert "library/json.rst.txt" in by_id
    assert ":mod:`json`" in by_id["library/json.rst.txt"]
    assert [d.id for d in docs] == sorted(by_id)


def test_python_docs_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "PYTHON_DOCS_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"apt-get install python3\.11-doc.*stdlib-docstrings"):
        data.load_documents("python-docs")


def test_stdlib_docstrings_are_read_without_importing_anything():
    before = set(sys.modules)
    docs = data.load_documents("stdlib-docstrings")
    # `this` prints the Zen and `antigravity` opens a browser when imported: parsing must not import.
    assert not {"this", "antigravity", "tkinter", "turtle"} & (set(sys.modules) - before)
    by_id = {d.id: d.text for d in docs}
    assert len(docs) > 100
    assert [d.id for d in docs] == sorted(by_id)
    assert not any(i == "test" or i.startswith(("test.", "lib2to3.tests")) for i in by_id)
    decoder = by_id["json.decoder"]
    assert decoder.startswith("json.decoder\nImplementation of JSONDecoder")
    assert "def json.decoder.JSONDecoder.decode(self, s, _w=WHITESPACE.match)\nReturn the Python representation" \
        in decoder
    assert sum("Return" in text for text in by_id.values()) > 100


def test_module_docstrings_layout():
    import ast

    source = '''
"""Module doc."""
import sys

class A(Base, metaclass=M):
    """Class doc."""
    def method(self, x=1):
        """Method doc."""
        def inner():
            """Nested helpers are left out."""
    def undocumented(self):
        pass

if sys.platform == "win32":
    async def fetch(url, *, timeout=None):
        """Platform-specific doc."""
'''
    text = data.module_docstrings("pkg.mod", ast.parse(source))
    assert text == (
        "pkg.mod\nModule doc.\n\n"
        "class pkg.mod.A(Base, metaclass=M)\nClass doc.\n\n"
        "def pkg.mod.A.method(self, x=1)\nMethod doc.\n\n"
        "async def pkg.mod.fetch(url, *, timeout=None)\nPlatform-specific doc."
    )
    assert data.module_docstrings("m", ast.parse("x = 1\ndef f():\n    pass\n")) == ""


def test_hub_dataset_is_loaded_with_name_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict({"content": ["one", "", "three"], "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = data.load_documents("someone/corpus", text_field="content", split="validation", config_name="en")
    assert calls == [("someone/corpus", "en", "validation")]
    assert docs == [Document("0", "one"), Document("2", "three")]
    with pytest.raises(DataError, match=r"'someone/corpus'.*no column 'text'.*\['content', 'n'\]"):
        data.load_documents("someone/corpus")


def test_unknown_hub_dataset_offline_fails_fast_with_one_line():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by tests/conftest.py
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.load_documents("nobody-kvforge/no-such-dataset")
    assert time.perf_counter() - started < 15
    message = str(info.value)
    assert message.startswith("dataset 'nobody-kvforge/no-such-dataset' is not a local path and could not be "
                              "loaded from the Hugging Face hub (offline?): ")
    assert "\n" not in message


def test_nonexistent_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        data.load_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="'./not-here' looks like a path"):
        data.load_documents("./not-here")


# ----------------------------------------------------------------------------------------------------
# Bad data


def test_jsonl_row_without_text_field_names_file_and_line(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=rf"{path} line 3: row has no field 'text' \(fields: \['body'\]\)"):
        data.load_documents(path)


@pytest.mark.parametrize("line, problem", [
    ('{"text": null}', "field 'text' is null"),
    ('{"text": 3}', "field 'text' is a int; expected a string"),
    ('["text"]', "expected a JSON object with a 'text' field, got list"),
    ('{"text": "unterminated}', "invalid JSON"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "rows.jsonl", '{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"rows\.jsonl line 2: .*{problem}"):
        data.load_documents(path)


def test_unsupported_file_named_directly_and_folder_without_text(tmp_path):
    path = write(tmp_path / "weights.bin", b"\0")
    with pytest.raises(DataError, match=r"weights\.bin has an unsupported type; expected one of \.txt"):
        data.load_documents(path)
    with pytest.raises(DataError, match=r"contains no \.txt/.* files \(1 other files ignored\)"):
        data.load_documents(str(tmp_path))


def test_empty_documents_skipped_and_invalid_utf8_replaced_and_counted(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n=6)
    write(corpus / "empty.txt", "")
    write(corpus / "blank.md", "  \n\t\n")
    write(corpus / "rows.jsonl", '{"text": "   "}\n{"text": "kept row"}\n')
    write(corpus / "latin1.txt", "caf\xe9 au lait".encode("latin-1"))
    write(corpus / "notes.pdf", b"%PDF")

    docs = data.load_documents(str(corpus))
    assert [d.text for d in docs if d.id == "latin1.txt"] == ["caf\ufffd au lait"]
    assert "rows.jsonl:2" in {d.id for d in docs} and "empty.txt" not in {d.id for d in docs}

    stats = data.build_packed_datasets(settings(str(corpus), tmp_path), tokenizer, EOS).stats
    assert stats["skipped_empty_documents"] == 3
    assert stats["invalid_utf8_files"] == 1
    assert stats["ignored_files"] == 1
    assert stats["train_documents"] + stats["eval_documents"] == 6 + 2


def test_no_documents_at_all(tmp_path):
    write(tmp_path / "empty.txt", " ")
    with pytest.raises(DataError, match="has no non-empty documents"):
        data.load_documents(str(tmp_path))


def test_dataset_smaller_than_one_row_says_how_many_tokens(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", n=4, words=6)
    with pytest.raises(DataError, match=r"split of .* has \d+ tokens \(\d+ documents, eos included\) but one "
                                        r"row of seq_len=4096 needs 4096"):
        data.build_packed_datasets(settings(corpus, tmp_path, seq_len=4096), tokenizer, EOS)


def test_bad_settings_are_named(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", n=3)
    with pytest.raises(DataError, match=r"unknown data settings \['seqlen'\]"):
        data.build_packed_datasets({"source": corpus, "seqlen": 8}, tokenizer, EOS)
    with pytest.raises(DataError, match="seq_len must be an integer >= 2, got 0"):
        data.build_packed_datasets(settings(corpus, tmp_path, seq_len=0), tokenizer, EOS)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(DataError, match=f"eval_fraction must be in \\(0, 1\\), got {fraction}"):
            data.build_packed_datasets(settings(corpus, tmp_path, eval_fraction=fraction), tokenizer, EOS)
    with pytest.raises(DataError, match=rf"eos_token_id must be a token id in \[0, {len(tokenizer)}\), got -1"):
        data.build_packed_datasets(settings(corpus, tmp_path), tokenizer, -1)
    with pytest.raises(DataError, match="max_documents must be a positive integer"):
        data.build_packed_datasets(settings(corpus, tmp_path, max_documents=0), tokenizer, EOS)


# ----------------------------------------------------------------------------------------------------
# Split


def test_split_is_by_document_deterministic_and_stable():
    docs = [Document(f"file{i}.txt", f"text {i}") for i in range(2000)]
    train, eval_ = data.split_documents(docs, 0.05, seed=0)
    assert {d.id for d in train}.isdisjoint({d.id for d in eval_})
    assert len(train) + len(eval_) == 2000
    assert 60 <= len(eval_) <= 140  # ~100 expected
    assert data.split_documents(docs, 0.05, seed=0) == (train, eval_)
    assert data.split_documents(docs, 0.05, seed=1)[1] != eval_
    # A document's side depends only on its own id: dropping others never moves it.
    _, eval_half = data.split_documents(docs[:1000], 0.05, seed=0)
    assert {d.id for d in eval_half} == {d.id for d in eval_ if int(d.id[4:-4]) < 1000}


def test_split_gives_each_side_a_document_and_rejects_too_few():
    two = [Document("a", "x"), Document("b", "y")]
    for fraction in (1e-9, 0.999999):
        train, eval_ = data.split_documents(two, fraction)
        assert len(train) == len(eval_) == 1
    with pytest.raises(DataError, match="needs at least 2 documents, got 1"):
        data.split_documents(two[:1], 0.5)
    with pytest.raises(DataError, match="document id 'a' appears more than once"):
        data.split_documents([two[0], two[0]], 0.5)


def test_max_documents_takes_the_first_in_source_order(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n=8)
    assert [d.id for d in data.load_documents(corpus, max_documents=3)] == ["doc00.txt", "doc01.txt", "doc02.txt"]


# ----------------------------------------------------------------------------------------------------
# Packing and the pipeline


def test_pack_token_ids_puts_eos_after_every_document_and_drops_the_tail():
    rows, dropped = data.pack_token_ids([[5, 6, 7], [8, 9], [10, 11, 12, 13]], eos_token_id=0, seq_len=4)
    assert rows.dtype == torch.int32
    assert rows.tolist() == [[5, 6, 7, 0], [8, 9, 0, 10], [11, 12, 13, 0]]
    assert dropped == 0
    rows, dropped = data.pack_token_ids([[5, 6, 7], [8, 9]], eos_token_id=0, seq_len=4)
    assert rows.tolist() == [[5, 6, 7, 0]] and dropped == 3


def test_build_packs_each_split_from_its_own_documents(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n=12)
    packed = data.build_packed_datasets(settings(str(corpus), tmp_path), tokenizer, EOS, show_progress=False)
    train_docs, eval_docs = data.split_documents(data.load_documents(str(corpus)), 0.25, seed=0)
    for rows, docs, split in ((packed.train, train_docs, "train"), (packed.eval, eval_docs, "eval")):
        stream = [t for d in docs for t in encode(tokenizer, d.text) + [EOS]]
        n_rows = len(stream) // 16
        assert rows.shape == (n_rows, 16) and rows.dtype == torch.int32
        assert rows.flatten().tolist() == stream[: n_rows * 16]
        assert packed.stats[f"{split}_documents"] == len(docs)
        assert packed.stats[f"{split}_tokens"] == len(stream)
        assert packed.stats[f"{split}_rows"] == n_rows
    # No document's text ends up in both splits.
    train_text, eval_text = tokenizer.decode(packed.train.flatten()), tokenizer.decode(packed.eval.flatten())
    markers = {f"doc{i:02d}" for i in range(12)}
    assert {m for m in markers if m in train_text}.isdisjoint({m for m in markers if m in eval_text})
    # A SimpleNamespace (or DataConfig) works like a dict; the split seed changes the eval documents.
    other = data.build_packed_datasets(SimpleNamespace(**settings(str(corpus), tmp_path), seed=7), tokenizer, EOS)
    assert not torch.equal(other.eval, packed.eval)


def test_cache_hit_skips_tokenizing_and_a_changed_file_invalidates_it(tmp_path, tokenizer, monkeypatch):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n=6)
    calls = []
    real_tokenize = data.tokenize_documents
    monkeypatch.setattr(data, "tokenize_documents", lambda *a, **k: calls.append(1) or real_tokenize(*a, **k))
    cfg = settings(str(corpus), tmp_path)

    first = data.build_packed_datasets(cfg, tokenizer, EOS)
    assert len(calls) == 2 and first.stats["cache_hit"] is False  # train + eval
    second = data.build_packed_datasets(cfg, tokenizer, EOS)
    assert len(calls) == 2 and second.stats["cache_hit"] is True
    assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
    assert second.stats["train_tokens"] == first.stats["train_tokens"]
    cache_files = os.listdir(tmp_path / "cache")
    assert len(cache_files) == 1 and cache_files[0].endswith(".pt")  # no temporary files left behind

    # Any key part changing means a new entry: seq_len here, file contents below.
    data.build_packed_datasets({**cfg, "seq_len": 8}, tokenizer, EOS)
    assert len(calls) == 4
    with open(corpus / "doc03.txt", "a") as f:
        f.write(" appended words change size and mtime")
    third = data.build_packed_datasets(cfg, tokenizer, EOS)
    assert len(calls) == 6 and third.stats["cache_hit"] is False
    assert third.stats["train_tokens"] + third.stats["eval_tokens"] > first.stats["train_tokens"] + \
        first.stats["eval_tokens"]


def test_cache_dir_from_environment_and_damaged_file_rebuilt(tmp_path, tokenizer, monkeypatch, caplog):
    corpus = make_corpus(tmp_path / "corpus", n=4)
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "kvcache"))
    assert data.default_cache_dir() == tmp_path / "kvcache" / "data"
    cfg = {"source": corpus, "seq_len": 16}
    first = data.build_packed_datasets(cfg, tokenizer, EOS)
    cache_file = tmp_path / "kvcache" / "data" / os.path.basename(first.stats["cache_file"])
    assert cache_file.is_file()
    cache_file.write_bytes(b"truncated")
    again = data.build_packed_datasets(cfg, tokenizer, EOS)
    assert again.stats["cache_hit"] is False and torch.equal(again.train, first.train)
    assert "ignoring unreadable data cache" in caplog.text
    assert data.build_packed_datasets(cfg, tokenizer, EOS).stats["cache_hit"] is True


# ----------------------------------------------------------------------------------------------------
# Batches


def numbered_rows(n: int, seq_len: int = 3) -> torch.Tensor:
    """Row i holds i in every position, so a batch says which rows it read."""
    return torch.arange(n, dtype=torch.int32)[:, None].expand(n, seq_len).contiguous()


def read_rows(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_ranks_read_disjoint_rows_covering_the_epoch():
    rows = numbered_rows(24)
    world, mbs, steps_per_epoch = 2, 3, 4
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            for rank in range(world):
                batch = data.micro_batch(rows, step, rank, world, mbs, seed=5)
                assert batch.shape == (mbs, 3) and batch.dtype == torch.long
                seen += read_rows(batch)
        assert sorted(seen) == list(range(24))  # every row exactly once per epoch
    epoch0 = [read_rows(data.micro_batch(rows, s, 0, world, mbs, seed=5)) for s in range(4)]
    epoch1 = [read_rows(data.micro_batch(rows, s, 0, world, mbs, seed=5)) for s in range(4, 8)]
    assert epoch0 != epoch1  # a new permutation each epoch
    assert read_rows(data.micro_batch(rows, 0, 0, world, mbs, seed=6)) != epoch0[0]


def test_epoch_with_leftover_rows_never_gives_a_short_batch():
    rows = numbered_rows(23)  # 23 = 3 steps of 2 ranks x 3 rows + 5 left over
    for step in range(3):
        seen = [r for rank in range(2) for r in read_rows(data.micro_batch(rows, step, rank, 2, 3, seed=0))]
        assert len(seen) == 6
    epoch = [r for s in range(3) for rank in range(2) for r in read_rows(data.micro_batch(rows, s, rank, 2, 3, 0))]
    assert len(set(epoch)) == 18
    assert data.micro_batch(rows, 3, 0, 2, 3, seed=0).shape == (3, 3)  # step 3 opens epoch 1
    with pytest.raises(DataError, match=r"has 5 rows \(15 tokens\) but one step over world_size=2 ranks with "
                                        r"micro_batch_size=3 needs 6 rows \(18 tokens\)"):
        data.micro_batch(numbered_rows(5), 0, 0, 2, 3, seed=0)


def test_resumed_batches_equal_the_uninterrupted_ones_even_in_a_new_process():
    rows = numbered_rows(40)
    running = [read_rows(data.micro_batch(rows, step, 1, 2, 4, seed=3)) for step in range(12)]
    data._epoch_permutation.cache_clear()
    assert [read_rows(data.micro_batch(rows, step, 1, 2, 4, seed=3)) for step in (9, 4, 11)] == \
        [running[9], running[4], running[11]]
    script = ("import torch; from kvforge.trainer import data; "
              "rows = torch.arange(40, dtype=torch.int32)[:, None].expand(40, 3); "
              "print(data.micro_batch(rows, 9, 1, 2, 4, seed=3)[:, 0].tolist())")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(fresh.stdout) == running[9]


def test_eval_batches_split_rows_across_ranks():
    rows = numbered_rows(11)
    per_rank = [[read_rows(b) for b in data.eval_batches(rows, rank, 3, 2)] for rank in range(3)]
    # 11 rows -> 9 usable; rank r reads r::3 -> 3 rows each, batches of 2 then 1 on every rank.
    assert per_rank == [[[0, 3], [6]], [[1, 4], [7]], [[2, 5], [8]]]
    assert [read_rows(b) for b in data.eval_batches(rows, 0, 1, 4, max_batches=2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert next(data.eval_batches(rows, 0, 1, 4)).dtype == torch.long
    with pytest.raises(DataError, match="the eval set has 2 rows, fewer than world_size=3"):
        list(data.eval_batches(numbered_rows(2), 0, 3, 1))
