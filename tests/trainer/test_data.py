"""trainer/data.py: every source kind, bad data, the split, packing, the cache, and rank batches.

A tiny byte-level BPE tokenizer trained here stands in for the real one, so no test needs the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from launch_scripts import load_launch_script
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


def test_pack_corpus_makes_one_document_per_file_that_the_data_layer_reads(tmp_path, capsys):
    """launch/pack_corpus.py: files by extension, .gz decompressed, short, non-UTF-8 and repeated texts left out; the
    .xz output, decompressed, is a jsonl source like any other."""
    import gzip
    import lzma

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    long = "Documentation prose. " * 20
    (docs / "a.rst").write_text("A " + long)
    (docs / "sub" / "b.rst.gz").write_bytes(gzip.compress(("B " + long).encode()))
    (docs / "sub" / "c.txt").write_text("A " + long)  # the same text as a.rst
    (docs / "d.txt").write_text("too short")
    (docs / "e.pod").write_bytes(b"\xff\xfe" + long.encode())
    (docs / "f.html").write_text("<p>" + long)  # not an extension it keeps
    pack = load_launch_script("pack_corpus")
    out = tmp_path / "corpus.jsonl.xz"
    assert pack.main([str(docs), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in lzma.open(out, "rt")]
    assert [(r["source"], r["text"][:2]) for r in rows] == [("docs/a.rst", "A "), ("docs/sub/b.rst.gz", "B ")]
    (tmp_path / "corpus.jsonl").write_bytes(lzma.decompress(out.read_bytes()))
    assert [d.text[:2] for d in data.load_documents(str(tmp_path / "corpus.jsonl"))] == ["A ", "B "]
    with pytest.raises(SystemExit, match="does not exist"):
        pack.main([str(tmp_path / "nope"), "--out", str(out)])

    # A dictd dictionary (.dict.dz: gzip) cut at blank lines, without the paragraphs that quote the held-out text.
    held_out = tmp_path / "fortunes"
    held_out.mkdir()
    quote = "Cynic, n. A blackguard whose faulty vision sees things as they are, not as they ought to be."
    (held_out / "definitions").write_text(f"%\n{quote.upper()}\n\t-- Ambrose Bierce\n%\n")
    entries = [(f"Word{i} n. An entry of the dictionary, number {i}, with a definition. " * 4).strip() for i in range(30)]
    entries[7] = "Cynic \\Cyn\"ic\\, n.\n   " + quote.replace(" as they", "\n   as they")  # rewrapped, same words
    dictionaries = tmp_path / "dictd"
    dictionaries.mkdir()
    (dictionaries / "devil.dict.dz").write_bytes(gzip.compress("\n\n".join(entries).encode()))
    out = tmp_path / "prose.jsonl"
    assert pack.main([str(dictionaries), "--out", str(out), "--extensions", ".dict", "--split-chars", "2000",
                      "--exclude-overlap", str(held_out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    text = "\n\n".join(r["text"] for r in rows)
    assert len(rows) > 1 and all(len(r["text"]) <= 2000 + 400 for r in rows)
    assert [r["source"] for r in rows][:2] == ["dictd/devil.dict.dz#0", "dictd/devil.dict.dz#1"]
    assert "Cynic" not in text and all(e in text for i, e in enumerate(entries) if i != 7)
    with pytest.raises(SystemExit):
        pack.main([str(dictionaries), "--out", str(out), "--overlap-words", "0"])
    assert "--overlap-words must be >= 1, got 0" in capsys.readouterr().err


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
    # Keyed by content: the same bytes written again (a new mtime, as a copy or a file rebuilt from parts has) hit
    # the cache; a same-size edit does not.
    text = (corpus / "doc03.txt").read_text()
    (corpus / "doc03.txt").write_text(text)
    os.utime(corpus / "doc03.txt", ns=(1, 1))
    assert data.build_packed_datasets(cfg, tokenizer, EOS).stats["cache_hit"] is True and len(calls) == 6
    (corpus / "doc03.txt").write_text(text.replace("appended", "APPENDED"))
    assert data.build_packed_datasets(cfg, tokenizer, EOS).stats["cache_hit"] is False


def test_content_digest_samples_files_over_its_limit(tmp_path, monkeypatch):
    """Above _FULL_DIGEST_BYTES a file is keyed by its size and evenly spaced samples (head and tail included):
    a change in a sampled range or in the size is seen."""
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    full = data.content_digest(path)
    monkeypatch.setattr(data, "_FULL_DIGEST_BYTES", 1024)
    monkeypatch.setattr(data, "_DIGEST_SAMPLE_BYTES", 16)
    sampled = data.content_digest(path)
    assert sampled != full and sampled == data.content_digest(path)
    for offset in (0, len(path.read_bytes()) - 1):  # the first and the last byte are in the samples
        changed = bytearray(path.read_bytes())
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert data.content_digest(path) != sampled
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
    path.write_bytes(path.read_bytes() + b"x")
    assert data.content_digest(path) != sampled


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


# ----------------------------------------------------------------------------------------------------
# Teacher samples


@pytest.fixture(scope="module")
def tiny_teacher(tokenizer):
    """A tiny random Llama over the test tokenizer's vocabulary (2 layers, hidden size 32): seconds to sample."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    return LlamaForCausalLM(config).eval()


def teacher_of(model, loads: list | None = None, **identity) -> data.Teacher:
    def load():
        if loads is not None:
            loads.append(1)
        return model

    return data.Teacher({"name": "tiny-random", **identity}, load)


def teacher_settings(tmp_path, **overrides):
    ts = {"tokens": 96, "sample_len": 8, "batch_size": 4, "seed": 3, **overrides.pop("ts", {})}
    return settings("teacher-samples", tmp_path, teacher_samples=ts, **overrides)


def test_teacher_samples_are_deterministic_for_a_seed_differ_for_another_and_are_cached(tmp_path, tokenizer,
                                                                                        tiny_teacher):
    loads = []
    first = data.build_packed_datasets(teacher_settings(tmp_path), tokenizer, EOS, teacher=teacher_of(tiny_teacher,
                                                                                                      loads))
    assert first.stats["cache_hit"] is False and len(loads) == 1
    # The same settings elsewhere sample again, and get the same tokens.
    again = data.build_packed_datasets(teacher_settings(tmp_path / "other"), tokenizer, EOS,
                                       teacher=teacher_of(tiny_teacher))
    assert again.stats["cache_hit"] is False
    assert torch.equal(first.train, again.train) and torch.equal(first.eval, again.eval)
    # ... and the same cache is read, not sampled.
    cached = data.build_packed_datasets(teacher_settings(tmp_path), tokenizer, EOS, teacher=teacher_of(tiny_teacher,
                                                                                                       loads))
    assert cached.stats["cache_hit"] is True and len(loads) == 1 and torch.equal(cached.train, first.train)
    other_seed = data.build_packed_datasets(teacher_settings(tmp_path, ts={"seed": 4}), tokenizer, EOS,
                                            teacher=teacher_of(tiny_teacher, loads))
    assert len(loads) == 2 and not torch.equal(other_seed.train, first.train)
    # Another teacher (its identity) is another cache entry.
    data.build_packed_datasets(teacher_settings(tmp_path), tokenizer, EOS,
                               teacher=teacher_of(tiny_teacher, loads, name="another-model"))
    assert len(loads) == 3
    # Sampling left the caller's torch RNG as it was.
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    data.build_packed_datasets(teacher_settings(tmp_path / "third"), tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert torch.equal(torch.rand(3), expected)


def test_teacher_samples_have_the_configured_lengths_and_each_starts_a_document(tmp_path, tokenizer, tiny_teacher):
    # 100 tokens in samples of 8 -> 13 samples; seq_len 16 holds two samples per row; eval: ceil(13 * 0.25) = 4.
    packed = data.build_packed_datasets(teacher_settings(tmp_path, ts={"tokens": 100}), tokenizer, EOS,
                                        teacher=teacher_of(tiny_teacher))
    stats = packed.stats
    assert (stats["samples"], stats["sample_len"], stats["train_samples"], stats["eval_samples"]) == (13, 8, 9, 4)
    assert packed.train.shape == (4, 16) and packed.eval.shape == (2, 16) and packed.train.dtype == torch.int32
    assert stats["train_dropped_tail_tokens"] == 8
    samples = torch.cat([packed.train.reshape(-1, 8), packed.eval.reshape(-1, 8)])
    assert (samples[:, 0] == EOS).all()
    assert (samples >= 0).all() and (samples < len(tokenizer)).all()
    # A random tiny model writes the separator now and then; suppress_eos bans it after the first token.
    free = data.build_packed_datasets(teacher_settings(tmp_path, ts={"tokens": 400, "temperature_min": 1.5,
                                                                     "temperature_max": 2.0, "top_p": 1.0}),
                                      tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert free.stats["sampled_separators"] > 0
    banned = data.build_packed_datasets(
        teacher_settings(tmp_path, ts={"tokens": 400, "temperature_min": 1.5, "temperature_max": 2.0, "top_p": 1.0,
                                       "suppress_eos": True}), tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert banned.stats["sampled_separators"] == 0
    assert (banned.train.reshape(-1, 8)[:, 1:] != EOS).all()
    # sample_len defaults to seq_len: one sample per row.
    whole = data.build_packed_datasets(teacher_settings(tmp_path, ts={"sample_len": None, "tokens": 64}),
                                       tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert whole.stats["sample_len"] == 16 and (whole.train[:, 0] == EOS).all() and (whole.eval[:, 0] == EOS).all()


def test_prefixed_samples_continue_a_window_of_real_train_text(tmp_path, tokenizer, tiny_teacher):
    corpus = make_corpus(tmp_path / "corpus", n=12)
    cfg = teacher_settings(tmp_path, ts={"tokens": 160, "sample_len": 16, "prefix_source": corpus,
                                         "prefix_fraction": 1.0, "prefix_tokens": 5})
    packed = data.build_packed_datasets(cfg, tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert packed.stats["prefixed_samples"] == 10
    documents = data.load_documents(corpus)
    train_docs, eval_docs = data.split_documents(documents, 0.25, 0)

    def windows(docs):
        return {tuple(ids[i:i + 5]) for d in docs for ids in [encode(tokenizer, d.text)] for i in range(len(ids) - 4)}

    train_windows = windows(train_docs)
    samples = torch.cat([packed.train, packed.eval]).reshape(-1, 16)
    assert all(tuple(s[1:6].tolist()) in train_windows for s in samples)
    assert len({tuple(s[1:6].tolist()) for s in samples}) > 1  # windows vary
    # Prefixes come from the train split only; none of the eval documents' own windows is used unless shared.
    only_eval = windows(eval_docs) - train_windows
    assert not any(tuple(s[1:6].tolist()) in only_eval for s in samples)


@pytest.fixture()
def chat_tokenizer(tokenizer):
    """The test tokenizer with a chat template (a copy: the module's tokenizer has none)."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return chat


def test_instructed_samples_continue_a_chat_framed_instruction_and_none_leave_sampling_as_it_was(
        tmp_path, chat_tokenizer, tiny_teacher):
    from kvforge.trainer.config import TeacherSamplesConfig

    lines = ["Write a poem about cats.", "Tell a joke about taxes, please.", "Describe the sea."]
    (tmp_path / "instructions.txt").write_text("\n".join(lines) + "\n\n")
    ts = TeacherSamplesConfig(batch_size=4, seed=5, top_p=0.9, instruction_fraction=1.0,
                              instructions=str(tmp_path / "instructions.txt"))
    prompts = data.instruction_prompts(ts, chat_tokenizer)
    assert [chat_tokenizer.decode(p) for p in prompts] == [f"user: {line}\nassistant: " for line in lines]
    rows, stats = data.teacher_sample_rows(tiny_teacher, ts, 10, 64, EOS, show_progress=False, instructions=prompts)
    assert stats["instructed_samples"] == 10 and (rows[:, 0] == EOS).all()
    # Each sample goes on from the separator with one whole instruction (of its own length), then the teacher's text.
    heads = {tuple(p.tolist()) for p in prompts}
    starts = [next(h for h in heads if tuple(row[1:1 + len(h)].tolist()) == h) for row in rows]
    assert len(set(starts)) > 1
    # Both engines draw the same tokens, and the same seed draws them again.
    by_generate, _ = data.teacher_sample_rows(tiny_teacher, dataclasses.replace(ts, engine="generate"), 10, 64, EOS,
                                              show_progress=False, instructions=prompts)
    assert torch.equal(rows, by_generate)
    # Part instructed, part prefixed, part bare; with no instruction drawn the samples are the ones drawn before
    # instructions existed (the same random stream up to them).
    mixed = dataclasses.replace(ts, instruction_fraction=0.5, prefix_fraction=0.3, prefix_source="unused")
    prefixes = [torch.arange(10, 30).numpy()]
    _, stats = data.teacher_sample_rows(tiny_teacher, mixed, 40, 64, EOS, prefixes, False, prompts)
    assert 0 < stats["instructed_samples"] < 40 - stats["prefixed_samples"] and stats["prefixed_samples"] > 0
    plain = dataclasses.replace(mixed, instruction_fraction=0.0)
    assert torch.equal(data.teacher_sample_rows(tiny_teacher, plain, 12, 64, EOS, prefixes, False, prompts)[0],
                       data.teacher_sample_rows(tiny_teacher, plain, 12, 64, EOS, prefixes, False)[0])


def test_instructions_enter_the_sample_cache_key_only_when_drawn_and_their_errors_name_the_setting(
        tmp_path, tokenizer, chat_tokenizer, tiny_teacher):
    from kvforge.trainer.config import TeacherSamplesConfig
    from kvforge.trainer.instructions import builtin_instructions

    plain = data.build_packed_datasets(teacher_settings(tmp_path, ts={"sample_len": 16}), chat_tokenizer, EOS,
                                       teacher=teacher_of(tiny_teacher))
    # instructions named but none drawn: the same cache entry.
    unused = data.build_packed_datasets(teacher_settings(tmp_path, ts={"sample_len": 16, "instructions": None}),
                                        chat_tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert unused.stats["cache_hit"] is True and plain.stats["cache_file"] == unused.stats["cache_file"]
    (tmp_path / "short.txt").write_text("Sing.\nWrite.\n")
    instructed = data.build_packed_datasets(
        teacher_settings(tmp_path, seq_len=64, ts={"sample_len": 64, "tokens": 256, "instruction_fraction": 1.0,
                                                   "instructions": str(tmp_path / "short.txt")}),
        chat_tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    assert instructed.stats["cache_hit"] is False and instructed.stats["instructed_samples"] == 4
    assert all(chat_tokenizer.decode(row[1:8]).startswith("user: ") for row in instructed.train)
    # Without a file, every built-in task with every topic.
    built_in = data.instruction_prompts(TeacherSamplesConfig(instruction_fraction=1.0), chat_tokenizer)
    assert len(built_in) == len(builtin_instructions()) > 1000
    assert chat_tokenizer.decode(built_in[0]) == f"user: {builtin_instructions()[0]}\nassistant: "
    with pytest.raises(DataError, match=r"instruction_fraction = 0.5 needs a tokenizer with a chat template"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"instruction_fraction": 0.5}), tokenizer, EOS,
                                   teacher=teacher_of(tiny_teacher))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"instructions = '.*empty.txt': the file holds no instruction"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"instruction_fraction": 0.5,
                                                                  "instructions": str(tmp_path / "empty.txt")}),
                                   chat_tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    with pytest.raises(DataError, match=r"an instruction of \d+ tokens leaves no room to generate in a sample of 8 "):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"instruction_fraction": 1.0}), chat_tokenizer,
                                   EOS, teacher=teacher_of(tiny_teacher))


def test_sample_warper_applies_each_rows_temperature_then_top_p(monkeypatch):
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    warped = data._SampleWarper(torch.tensor([1.0, 2.0]), top_p=1.0, banned=[])(None, scores.clone())
    assert torch.allclose(warped[0], scores[0]) and torch.allclose(warped[1], scores[1] / 2)
    nucleus = data._SampleWarper(torch.tensor([1.0, 1.0]), top_p=0.8, banned=[3])(None, scores.clone())
    # 0.5 + 0.3 reaches 0.8: the two most likely tokens stay; the banned one is gone either way.
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False]
    # Sorting only the top candidates gives what the full sort gives: peaked rows, flat ones (the fallback), and a
    # batch of both (only its flat row takes the fallback).
    generator = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 5000, generator=generator) * 8  # the top 64 hold > 0.97 at every temperature
    flat = torch.randn(3, 5000, generator=generator) * 0.01
    for scores in (peaked, flat, torch.cat([peaked[:2], flat[2:]])):
        warper = data._SampleWarper(torch.tensor([0.7, 1.0, 1.3]), top_p=0.9, banned=[])
        fast = warper(None, scores.clone())
        monkeypatch.setattr(data, "_NUCLEUS_CANDIDATES", 5000)
        assert torch.equal(warper(None, scores.clone()), fast)
        monkeypatch.setattr(data, "_NUCLEUS_CANDIDATES", 64)
    assert 1 < int(torch.isfinite(fast).sum(dim=1).min())


def test_teacher_samples_errors_name_the_setting(tmp_path, tokenizer, tiny_teacher):
    with pytest.raises(DataError, match="no teacher was given"):
        data.build_packed_datasets(teacher_settings(tmp_path), tokenizer, EOS)
    with pytest.raises(DataError, match=r"unknown teacher_samples settings \['temprature'\]"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"temprature": 1}), tokenizer, EOS)
    with pytest.raises(DataError, match=r"'data.teacher_samples.attention' = 'flash': expected one of auto, triton"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"attention": "flash"}), tokenizer, EOS)
    with pytest.raises(DataError, match=r"'data.teacher_samples.top_p' = 0: expected a probability in \(0, 1\]"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"top_p": 0}), tokenizer, EOS)
    with pytest.raises(DataError, match=r"'data.teacher_samples.sample_len' = 32: expected null \(= data.seq_len\) "
                                        r"or an integer in \[2, data.seq_len=16\]"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"sample_len": 32}), tokenizer, EOS)
    with pytest.raises(DataError, match=r"teacher_samples.tokens = 20 gives 3 samples of 8 tokens, but one train row "
                                        r"and one eval row of seq_len=16 need 32 tokens"):
        data.build_packed_datasets(teacher_settings(tmp_path, ts={"tokens": 20}), tokenizer, EOS,
                                   teacher=teacher_of(tiny_teacher))


@pytest.mark.parametrize("override, fragments", [
    ("data.teacher_samples.top_p=1.5", ["data.teacher_samples.top_p", "1.5", "(0, 1]"]),
    ("data.teacher_samples.temperature_min=2", ["'data.teacher_samples.temperature_min' = 2.0",
                                                "'data.teacher_samples.temperature_max' = 1.0", "min <= max"]),
    ("data.teacher_samples.temperature_max=0", ["'data.teacher_samples.temperature_max' = 0.0", "> 0"]),
    ("data.teacher_samples.sample_len=65", ["data.teacher_samples.sample_len", "data.seq_len=64"]),
    ("data.teacher_samples.tokens=0", ["data.teacher_samples.tokens", "positive"]),
    ("data.teacher_samples.batch_size=0", ["data.teacher_samples.batch_size"]),
    ("data.teacher_samples.dtype=fp8", ["data.teacher_samples.dtype", "auto, bfloat16"]),
    ("data.teacher_samples.prefix_fraction=0.5", ["'data.teacher_samples.prefix_source' = None",
                                                  "'data.teacher_samples.prefix_fraction' = 0.5"]),
    ("data.teacher_samples.prefix_source=teacher-samples", ["data.teacher_samples.prefix_source", "real text"]),
    ("data.teacher_samples.instruction_fraction=1.5", ["'data.teacher_samples.instruction_fraction' = 1.5",
                                                       "[0, 1 - prefix_fraction = 1]"]),
    ("data.teacher_samples.instructions=./missing.txt", ["'data.teacher_samples.instructions' = './missing.txt'",
                                                         "one instruction per line"]),
    ("data.teacher_samples.temprature_min=1", ["unknown config key 'data.teacher_samples.temprature_min'",
                                               "did you mean 'data.teacher_samples.temperature_min'"]),
    ("data.mix=[{source: python-docs, weight: 1}]", ["data.mix", "at least 2 entries"]),
    ("data.mix=[{source: python-docs, weight: 0}, {source: teacher-samples}]", ["data.mix[0].weight", "positive"]),
    ("data.mix=[{source: python-docs}, {source: python-docs}]", ["data.mix[1].source", "not already in data.mix"]),
    ("data.mix=[{source: python-docs, wieght: 1}, {source: teacher-samples}]", ["'data.mix'", "'wieght'",
                                                                              "did you mean 'weight'"]),
    ("data.mix=[{source: ./missing.jsonl}, {source: teacher-samples}]", ["data.mix[0].source", "does not exist"]),
    ("data.repeat=maybe", ["data.repeat", "true or false"]),
])
def test_bad_teacher_samples_mix_and_repeat_settings_fail_in_the_config_naming_the_key(override, fragments):
    from kvforge.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(REPO_CONFIGS / "tiny-llama.yaml", [override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_teacher_samples_as_data_source_with_compression_needs_a_calibration_source():
    from kvforge.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="compression.calibration.source"):
        load_config(REPO_CONFIGS / "smollm2-recover.yaml", ["data.source=teacher-samples"])
    cfg = load_config(REPO_CONFIGS / "smollm2-recover.yaml", ["data.source=teacher-samples",
                                                               "compression.calibration.source=python-docs"])
    assert cfg.data.source == "teacher-samples"


REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------------------------------
# Mixing sources and counting epochs


def mixed(sizes: dict[str, int], weights: dict[str, float], seq_len: int = 3) -> data.PackedData:
    """A mix whose row r holds r everywhere (rows numbered across the sources, in order)."""
    parts, start = [], 0
    total = sum(weights.values())
    for source, n in sizes.items():
        parts.append(data.SourcePart(source, weights[source] / total, start, start + n))
        start += n
    return data.PackedData(numbered_rows(start, seq_len), numbered_rows(2, seq_len), {}, tuple(parts))


def source_of(packed: data.PackedData, row: int) -> str:
    return next(p.source for p in packed.parts if p.start <= row < p.stop)


def test_mix_respects_the_weights_at_every_step_and_deals_each_row_once_per_step():
    packed = mixed({"a": 50, "b": 20, "c": 7}, {"a": 0.6, "b": 0.3, "c": 0.1})
    world, mbs, counts = 2, 5, {"a": 0, "b": 0, "c": 0}
    for step in range(40):
        step_rows = [r for rank in range(world) for r in read_rows(data.train_batch(packed, step, rank, world, mbs, 1))]
        assert len(step_rows) == world * mbs
        for row in step_rows:
            counts[source_of(packed, row)] += 1
        seen = (step + 1) * world * mbs
        for source, weight in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
            assert abs(counts[source] - weight * seen) <= 1.5, (step, counts)  # at every prefix, not on average
    # Within a source, rows go through permutations: 'c' (7 rows) read 40 times covers each row 5 or 6 times.
    assert counts["c"] == 40
    c_rows = [r for step in range(40) for rank in range(world)
              for r in read_rows(data.train_batch(packed, step, rank, world, mbs, 1)) if source_of(packed, r) == "c"]
    assert sorted(set(c_rows)) == list(range(70, 77)) and all(c_rows[:35].count(r) == 5 for r in range(70, 77))
    # The step's rows are dealt to the ranks in a seeded order: rank 0 does not always get the same sources.
    rank0 = [tuple(source_of(packed, r) for r in read_rows(data.train_batch(packed, s, 0, world, mbs, 1)))
             for s in range(10)]
    assert len(set(rank0)) > 1


def test_mix_counts_give_every_row_exactly_one_source():
    for weights in ([0.5, 0.5], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.01, 0.99]):
        counts = data._mix_counts(weights, __import__("numpy").arange(0, 5001))
        steps = counts[:, 1:] - counts[:, :-1]
        assert ((steps == 0) | (steps == 1)).all() and (steps.sum(axis=0) == 1).all()
        assert abs(counts[:, -1] - __import__("numpy").array(weights) * 5000).max() <= 1


def test_mixed_batches_depend_on_the_step_only_so_a_resume_reads_the_same_rows():
    packed = mixed({"a": 13, "b": 5}, {"a": 0.5, "b": 0.5})
    running = [read_rows(data.train_batch(packed, step, 1, 2, 3, seed=9)) for step in range(15)]
    data._epoch_permutation.cache_clear()
    assert [read_rows(data.train_batch(packed, step, 1, 2, 3, seed=9)) for step in (14, 3, 8)] == \
        [running[14], running[3], running[8]]
    assert read_rows(data.train_batch(packed, 0, 1, 2, 3, seed=10)) != running[0]


def test_epochs_per_source_equal_the_rows_actually_read():
    packed = mixed({"docs": 30, "teacher-samples": 8}, {"docs": 0.75, "teacher-samples": 0.25})
    world, mbs, micro_steps = 2, 2, 25
    read = {"docs": 0, "teacher-samples": 0}
    for step in range(micro_steps):
        for rank in range(world):
            for row in read_rows(data.train_batch(packed, step, rank, world, mbs, 0)):
                read[source_of(packed, row)] += 1
    epochs = data.source_epochs(packed, micro_steps, world, mbs)
    assert epochs == {"docs": read["docs"] / 30, "teacher-samples": read["teacher-samples"] / 8}
    assert epochs == {"docs": 75 / 30, "teacher-samples": 25 / 8}
    # One source: the passes micro_batch makes (23 rows -> 3 steps of 2 x 3 per epoch).
    single = data.PackedData(numbered_rows(23), numbered_rows(2), {"source": "python-docs"})
    assert data.source_epochs(single, 3, 2, 3) == {"python-docs": 1.0}
    assert data.source_epochs(single, 7, 2, 3) == {"python-docs": 7 / 3}
    assert data.epoch_metrics({"/data/set/x.jsonl": 0.5, "teacher-samples": 2.0}) == {
        "data/epochs/x.jsonl": 0.5, "data/epochs/teacher-samples": 2.0, "data/repeated_sources": 1}


def test_a_repeating_source_is_said_and_refused_without_data_repeat():
    epochs = {"python-docs": 0.4, "teacher-samples": 2.5}
    line = data.check_epochs(epochs, repeat=True, steps=100)
    assert line == ("data: 100 steps will read python-docs 0.4 times, teacher-samples 2.5 times; "
                    "REPEATED (epochs > 1): teacher-samples")
    with pytest.raises(DataError, match=r"100 steps would read 'teacher-samples' 2.50 times, and data.repeat=false "
                                        r"forbids .* or set data.repeat=true"):
        data.check_epochs(epochs, repeat=False, steps=100)
    assert data.check_epochs({"python-docs": 1.0}, repeat=False, steps=5).endswith("no source repeats")


def test_build_mixes_sources_with_weights_and_interleaves_their_eval_rows(tmp_path, tokenizer, tiny_teacher):
    corpus = make_corpus(tmp_path / "corpus", n=12)
    cfg = settings(corpus, tmp_path, mix=[{"source": corpus, "weight": 3}, {"source": "teacher-samples", "weight": 1}],
                   teacher_samples={"tokens": 160, "sample_len": 8, "batch_size": 8})
    packed = data.build_packed_datasets(cfg, tokenizer, EOS, teacher=teacher_of(tiny_teacher))
    alone = data.build_packed_datasets(settings(corpus, tmp_path), tokenizer, EOS)
    docs, teacher = packed.parts
    assert (docs.source, docs.weight, teacher.source, teacher.weight) == (corpus, 0.75, "teacher-samples", 0.25)
    assert torch.equal(packed.train[docs.start:docs.stop], alone.train)  # the source's own (cached) rows
    assert packed.stats["mix"] == {corpus: 0.75, "teacher-samples": 0.25}
    assert set(packed.stats["sources"]) == {corpus, "teacher-samples"}
    # Eval rows interleaved 3:1 (teacher rows start with the separator at every 8th position).
    is_teacher = [bool((row.reshape(-1, 8)[:, 0] == EOS).all()) for row in packed.eval]
    assert is_teacher[:4].count(True) == 1 and is_teacher[:8].count(True) == 2
    # A bad source inside the mix is named as such.
    bad = settings(corpus, tmp_path, mix=[{"source": corpus}, {"source": str(tmp_path / "nothing-here")}])
    with pytest.raises(FileNotFoundError):
        data.build_packed_datasets(bad, tokenizer, EOS)
    write(tmp_path / "rows.jsonl", '{"text": "fine"}\n{"txt": "oops"}\n')
    bad = settings(corpus, tmp_path, mix=[{"source": corpus}, {"source": str(tmp_path / "rows.jsonl")}])
    with pytest.raises(DataError, match=r"data.mix source '.*rows.jsonl': .*rows.jsonl line 2: row has no field "
                                        r"'text'"):
        data.build_packed_datasets(bad, tokenizer, EOS)
    with pytest.raises(DataError, match="mix has 1 entry"):
        data.build_packed_datasets(settings(corpus, tmp_path, mix=[{"source": corpus}]), tokenizer, EOS)


# ----------------------------------------------------------------------------------------------------
# A training run on a mix with teacher samples (launch/train.py in this process, a world of one)


def test_a_run_on_teacher_samples_mixed_with_docstrings_says_and_logs_how_often_it_read_each_source(
        launcher, tmp_path):
    import contextlib
    import io

    from kvforge.trainer.tracking import read_metrics

    common = ["--config", str(REPO_CONFIGS / "tiny-llama.yaml"), f"run.output_dir={tmp_path / 'run'}",
              "training.eval_every=0", "checkpoint.export_hf=false", "logging.wandb=disabled",
              "checkpoint.resume=never", "checkpoint.save_every=0", f"data.cache_dir={tmp_path / 'cache'}",
              "data.mix=[{source: teacher-samples, weight: 0.5}, {source: stdlib-docstrings, weight: 0.5}]",
              # A random model's nucleus is most of the vocabulary: top_p=1 spares a full sort per token.
              "data.teacher_samples.tokens=2048", "data.teacher_samples.batch_size=16", "data.teacher_samples.top_p=1"]

    def run(*overrides):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = launcher([*common, *overrides])
        return rc, out.getvalue(), err.getvalue()

    # 2048 tokens in 64-token samples: 32 samples, 28 train rows; 8 steps x 2 x 2 rows, half of them
    # teacher samples = 16 rows: 0.57 epochs, no repeat.
    rc, out, err = run("training.max_steps=8")
    assert rc == 0, (out[-3000:], err[-3000:])
    assert "'teacher-samples': {'source': 'teacher-samples'" in out and "'cache_hit': False" in out
    assert "data: 8 steps will read teacher-samples 0.571 times, stdlib-docstrings" in out
    assert "data: 8 steps read teacher-samples 0.571 times" in out and "no source repeats" in out
    final = read_metrics(tmp_path / "run", "data/epochs/teacher-samples")
    assert final[8]["data/epochs/teacher-samples"] == pytest.approx(16 / 28)
    assert final[8]["data/repeated_sources"] == 0
    # Longer, the teacher samples would repeat: refused without data.repeat (the samples come from the cache).
    rc, out, err = run("training.max_steps=16", "data.repeat=false", f"run.output_dir={tmp_path / 'r2'}")
    assert rc == 2 and "16 steps would read 'teacher-samples' 1.14 times" in err, (out[-2000:], err[-2000:])
    assert "'cache_hit': False" not in out


def test_the_static_engine_samples_what_generate_samples_and_a_bfloat16_copy_leaves_the_teacher_alone(
        tmp_path, tokenizer, tiny_teacher):
    from kvforge.trainer.config import TeacherSamplesConfig

    # Prefixed and unprefixed prompts, a last batch shorter than batch_size.
    ts = TeacherSamplesConfig(batch_size=4, seed=5, top_p=0.9, prefix_fraction=0.5, prefix_tokens=3,
                              prefix_source="unused")
    prefixes = [torch.arange(10, 30).numpy()]
    by_generate, stats = data.teacher_sample_rows(tiny_teacher, dataclasses.replace(ts, engine="generate"), 10, 12,
                                                  EOS, prefixes, show_progress=False)
    assert stats["engine"] == "generate" and 0 < stats["prefixed_samples"] < 10
    by_static, stats = data.teacher_sample_rows(tiny_teacher, ts, 10, 12, EOS, prefixes, show_progress=False)
    assert stats["engine"] == "static"
    assert torch.equal(by_generate, by_static)
    half, stats = data.teacher_sample_rows(tiny_teacher, dataclasses.replace(ts, dtype="bfloat16"), 6, 12, EOS,
                                           show_progress=False)
    assert stats["sample_dtype"] == "bfloat16" and half.shape == (6, 12)
    assert next(tiny_teacher.parameters()).dtype == torch.float32 and not tiny_teacher.training


def test_checkpoints_from_before_mix_and_teacher_samples_keep_their_resume_signature():
    from kvforge.trainer.config import load_config
    from kvforge.trainer.train import resume_signature

    plain = resume_signature(load_config(REPO_CONFIGS / "tiny-llama.yaml"), 2)
    assert not [k for k in plain if k.startswith(("data.mix", "data.teacher_samples", "data.repeat"))]
    assert resume_signature(load_config(REPO_CONFIGS / "tiny-llama.yaml", ["data.repeat=false"]), 2) == plain
    sampled = resume_signature(load_config(REPO_CONFIGS / "tiny-llama.yaml", ["data.source=teacher-samples"]), 2)
    assert sampled["data.teacher_samples.tokens"] == 1_000_000
    # The instruction keys count only when instructions are drawn (checkpoints from before them still resume).
    assert not [k for k in sampled if "instruction" in k]
    instructed = resume_signature(load_config(REPO_CONFIGS / "tiny-llama.yaml", [
        "data.source=teacher-samples", "data.teacher_samples.instruction_fraction=0.5"]), 2)
    assert instructed["data.teacher_samples.instruction_fraction"] == 0.5
    mix = "data.mix=[{source: teacher-samples, weight: 0.7}, {source: stdlib-docstrings, weight: 0.3}]"
    assert resume_signature(load_config(REPO_CONFIGS / "tiny-llama.yaml", [mix]), 2)["data.mix"] == [
        {"source": "teacher-samples", "weight": 0.7}, {"source": "stdlib-docstrings", "weight": 0.3}]


def test_the_same_tokenizer_from_another_folder_reads_the_cached_teacher_samples(tmp_path, tokenizer, tiny_teacher):
    # Every compressed run loads the tokenizer from its own compressed_init folder: the cache must not care.
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "b")
    from_a, from_b = AutoTokenizer.from_pretrained(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "b")
    assert from_a.name_or_path != from_b.name_or_path
    assert data.tokenizer_fingerprint(from_a) == data.tokenizer_fingerprint(from_b)
    first = data.build_packed_datasets(teacher_settings(tmp_path), from_a, EOS, teacher=teacher_of(tiny_teacher))
    again = data.build_packed_datasets(teacher_settings(tmp_path), from_b, EOS, teacher=teacher_of(tiny_teacher))
    assert first.stats["cache_hit"] is False and again.stats["cache_hit"] is True
    from_b.add_tokens(["<extra>"])
    assert data.tokenizer_fingerprint(from_a) != data.tokenizer_fingerprint(from_b)


def test_ranks_other_than_0_never_sample_and_every_rank_must_hold_rank_0s_rows(tmp_path, monkeypatch):
    """On several nodes each reads its own files and cache: a rank that finds no teacher samples where rank 0
    cached them says so instead of drawing its own (GPU draws differ), and ranks whose rows differ are named."""
    from kvforge.trainer import train
    from kvforge.trainer.build import build_model
    from kvforge.trainer.config import load_config

    cfg = load_config(REPO_CONFIGS / "tiny-llama.yaml", ["data.source=teacher-samples", f"data.cache_dir={tmp_path}",
                                                         "data.teacher_samples.tokens=2048"])
    model, tokenizer = build_model(cfg, None, tmp_path)
    # What rank 1 sees when rank 0 cached the samples on another node: no cache, and it must not sample.
    monkeypatch.setattr(train, "on_rank0_first", lambda rank, fn, others=None: others())
    with pytest.raises(DataError, match=rf"rank 1 finds no teacher samples where rank 0 cached them \({tmp_path}\)"):
        train.build_data(cfg, tokenizer, model, rank=1, world=2, load_teacher=lambda: model)

    packed = data.PackedData(torch.arange(8).reshape(2, 4), torch.arange(4).reshape(1, 4), {})
    monkeypatch.setattr(train.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * 3))
    train.check_same_data(packed, 3)
    monkeypatch.setattr(train.dist, "all_gather_object",
                        lambda out, obj: out.__setitem__(slice(None), [obj, obj, "another digest"]))
    with pytest.raises(DataError, match=r"ranks \[2\] packed other training data than rank 0: every node must read"):
        train.check_same_data(packed, 3)
