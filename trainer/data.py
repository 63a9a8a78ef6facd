"""Training data: documents from any source -> split by document -> tokenized, packed, cached -> batches.

    source ──load_documents──▶ [Document(id, text)]          (skips empty docs, counts them)
        ──split_documents (hash of (seed, id))──▶ train docs | eval docs      (no document in both)
        ──tokenize (batched, fast tokenizer) + pack_token_ids──▶ rows [N, seq_len] int32, per split
        ──micro_batch(rows, step, rank, ...)──▶ [micro_batch_size, seq_len] int64

Sources (one string, `source`):
  * ``python-docs``: the reStructuredText sources of the Python 3.11 documentation shipped by Debian's
    ``python3.11-doc`` package (~500 files, ~11 MB, ~2.9M SmolLM2 tokens). One document per file.
  * ``stdlib-docstrings``: the module, class and function docstrings of the standard library of the running
    Python, read from its source files with `ast` (nothing is imported, so no module's import-time side
    effects run; modules written in C have no source and are left out). One document per module.
  * a local file or folder: ``.txt``/``.md``/``.rst`` (one document per file), ``.jsonl``/``.json``/
    ``.parquet`` (one document per row, text in `text_field`); folders are walked recursively in sorted
    order, hidden entries skipped, other file types ignored and counted.
  * anything else: a Hugging Face hub dataset, ``datasets.load_dataset(source, config_name, split=split)``.
  * ``teacher-samples``: no documents; the original (teacher) model samples the corpus itself (`teacher_sample_rows`,
    settings in ``teacher_samples``), once: the samples are cached under ``<cache_dir>/teacher-samples-<key>/``
    (written with kvforge.atomic), the key covering the teacher's identity and every sampling setting.

Several sources: ``mix`` = [{source, weight}, ...]. Each source is built (and cached) as if it were alone; a run
reads a stream of rows in which each source holds its weight's share at every step (`train_batch`), and says how
many times it read each source (`source_epochs`, `check_epochs`: more than once needs ``repeat``).

Bad data: empty and whitespace-only documents are skipped and counted; files that are not valid UTF-8 are
decoded with U+FFFD replacement characters (a stray byte should not cost a whole document) and counted;
a row without the text field, a null or non-string text, a malformed JSON line or an unknown file type
named directly is an error naming the file and the 1-based row (line) number.

The packed tensors are cached under ``<cache_dir>/<key>.pt`` (default ``$KVFORGE_CACHE/data``, else
``~/.cache/kvforge/data``). The key covers everything that changes the result: the source's fingerprint
(paths, sizes and mtimes of its files; the hub dataset's fingerprint), the tokenizer (name, vocabulary
size and the ids it gives a few probe strings), seq_len, the split parameters, eos_token_id and
DATA_VERSION. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvforge import atomic

from .config import (TEACHER_SAMPLES, ConfigError, TeacherSamplesConfig, check_teacher_samples,
                     without_unused_instructions)
from .instructions import builtin_instructions

logger = logging.getLogger(__name__)

# Bump when anything in this file changes what ends up in the packed tensors; old cache files are then
# simply never looked up again.
DATA_VERSION = 1

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + ROW_SUFFIXES
# Test suites inside the stdlib are code, not documentation (and lib2to3's test data is Python 2).
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}
# Strings whose token ids stand in for "the same tokenizer" in the cache key (whitespace, code, unicode).
_TOKENIZER_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tclass A: pass\n",
    "  ünïcödé — 日本語 🙂 1234567890 <|endoftext|> </s>",
)
_TOKENIZE_BATCH_DOCUMENTS = 64


class DataError(ValueError):
    """A problem with a data source or its contents; the message names the file, row and fix."""


@dataclass(frozen=True)
class Document:
    """One document. `id` is stable across runs and machines (a relative path, ``path:line``, a module
    name or a row index): it decides the document's split, so a document never moves between splits."""

    id: str
    text: str


@dataclass(frozen=True)
class SourcePart:
    """One source of a mix: its training rows are ``PackedData.train[start:stop]``; `weight` is its share of
    the rows a run reads (normalised: the weights of a mix sum to 1)."""

    source: str
    weight: float
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class PackedData:
    """train, eval: [N, seq_len] int32 token ids (documents joined by eos, ragged tail dropped).
    stats: flat counts (documents, tokens, rows per split; skipped/ignored counts; cache info); a mix has the
    stats of each source under ``stats["sources"][source]``.
    parts: empty for one source; for a mix, where each source's training rows lie in `train` (eval rows are
    interleaved by weight, see `_combine`)."""

    train: torch.Tensor
    eval: torch.Tensor
    stats: dict[str, Any]
    parts: tuple[SourcePart, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Sources


class _Source:
    """A resolved source: a cheap `fingerprint` (no reading of contents) and the documents themselves."""

    description: str

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def documents(self, counts: Counter) -> Iterator[Document]:
        raise NotImplementedError


class _FileSource(_Source):
    """A file or a folder of files (also python-docs, which is a folder of .rst.txt files)."""

    def __init__(self, root: Path, text_field: str, description: str):
        self.root = root
        self.text_field = text_field
        self.description = description
        self.ignored: list[Path] = []
        if root.is_file():
            if not root.name.lower().endswith(SUPPORTED_SUFFIXES):
                raise DataError(
                    f"data file {root} has an unsupported type; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
                )
            self.files = [root]
        else:
            self.files = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    path = Path(dirpath, name)
                    if name.startswith("."):
                        continue
                    (self.files if name.lower().endswith(SUPPORTED_SUFFIXES) else self.ignored).append(path)
            self.files.sort(key=lambda path: relative_name(self.root, path))
            if not self.files:
                raise DataError(
                    f"folder {root} contains no {'/'.join(SUPPORTED_SUFFIXES)} files"
                    f" ({len(self.ignored)} other files ignored)"
                )

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "files", "root": str(self.root.resolve()), "text_field": self.text_field,
                "files": files_digest(self.root, self.files)}

    def documents(self, counts: Counter) -> Iterator[Document]:
        if self.ignored:
            counts["ignored_files"] += len(self.ignored)
        for path in self.files:
            rel = relative_name(self.root, path)
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                yield Document(rel, _read_text(path, counts))
            elif suffix == ".parquet":
                yield from self._parquet_rows(path, rel)
            else:
                yield from self._json_rows(path, rel, counts)

    def _json_rows(self, path: Path, rel: str, counts: Counter) -> Iterator[Document]:
        content = _read_text(path, counts)
        if path.suffix.lower() == ".json":
            # A .json file is one JSON value (a list of rows, or one row), or JSON Lines under a .json name.
            try:
                value = json.loads(content)
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":
                    raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
            else:
                rows = enumerate(value if isinstance(value, list) else [value], start=1)
                yield from self._rows_to_documents(path, rel, rows, "row")
                return
        yield from self._rows_to_documents(path, rel, _json_lines(path, content), "line")

    def _parquet_rows(self, path: Path, rel: str) -> Iterator[Document]:
        import pyarrow.parquet as pq  # a dependency of `datasets`; read directly to avoid an arrow-cache copy

        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        if self.text_field not in columns:
            raise DataError(
                f"{path} has no column {self.text_field!r} (columns: {columns}); set text_field to the "
                "column that holds the text"
            )
        row_number = 0
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=4096):
            texts = batch.column(0).to_pylist()
            rows = enumerate(texts, start=row_number + 1)
            row_number += len(texts)
            yield from self._rows_to_documents(path, rel, ((n, {self.text_field: t}) for n, t in rows), "row")

    def _rows_to_documents(
        self, path: Path, rel: str, rows: Iterable[tuple[int, Any]], unit: str
    ) -> Iterator[Document]:
        for number, row in rows:
            where = f"{path} {unit} {number}"
            if not isinstance(row, Mapping):
                raise DataError(f"{where}: expected a JSON object with a {self.text_field!r} field, got "
                                f"{type(row).__name__}")
            if self.text_field not in row:
                raise DataError(f"{where}: row has no field {self.text_field!r} (fields: {sorted(row)}); "
                                "set text_field to the field that holds the text")
            yield Document(f"{rel}:{number}", _check_text(row[self.text_field], where, self.text_field))


class _StdlibSource(_Source):
    """The docstrings of the running Python's standard library, one document per module."""

    description = "stdlib-docstrings"

    def __init__(self):
        self.stdlib = Path(sysconfig.get_paths()["stdlib"])
        self.modules: list[tuple[str, Path]] = []  # (dotted module name, source file), sorted by name
        for name in sorted(sys.stdlib_module_names):
            if (self.stdlib / f"{name}.py").is_file():
                self.modules.append((name, self.stdlib / f"{name}.py"))
            elif (self.stdlib / name / "__init__.py").is_file():
                self.modules.extend(self._package_modules(name, self.stdlib / name))
        if not self.modules:
            raise DataError(f"found no standard-library sources under {self.stdlib}")

    def _package_modules(self, package: str, folder: Path) -> list[tuple[str, Path]]:
        modules = []
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                if entry.name not in _STDLIB_SKIP_DIRS and (entry / "__init__.py").is_file():
                    modules.extend(self._package_modules(f"{package}.{entry.name}", entry))
            elif entry.suffix == ".py":
                modules.append((package if entry.name == "__init__.py" else f"{package}.{entry.stem}", entry))
        return sorted(modules)

    def fingerprint(self) -> dict[str, Any]:
        # Sizes and mtimes: an installed standard library keeps its package's mtimes until it is upgraded.
        listing = [(name, p.stat().st_size, p.stat().st_mtime_ns) for name, p in self.modules]
        return {"kind": "stdlib-docstrings", "python": sys.version, "stdlib": str(self.stdlib),
                "files": _digest(listing)}

    def documents(self, counts: Counter) -> Iterator[Document]:
        for name, path in self.modules:
            try:
                # Parsing bytes lets `ast` honour a file's coding cookie.
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError) as err:
                logger.warning("stdlib-docstrings: skipping %s (%s)", path, err)
                counts["skipped_unparsable_files"] += 1
                continue
            yield Document(name, module_docstrings(name, tree))


def module_docstrings(module_name: str, tree: ast.Module) -> str:
    """The docstrings of one parsed module as text: a header line per definition, then its docstring.

        json.decoder
        Implementation of JSONDecoder

        class json.decoder.JSONDecoder(object)
        Simple JSON <https://json.org> decoder ...

        def json.decoder.JSONDecoder.decode(self, s, _w=WHITESPACE.match)
        Return the Python representation of ``s`` ...

    Definitions without a docstring are left out; a module with none gives "" (skipped as empty).
    Functions nested inside functions are left out (they are implementation details).
    """
    blocks = []
    if doc := ast.get_docstring(tree):
        blocks.append(f"{module_name}\n{doc}")

    def visit(statements: Iterable[ast.AST], prefix: str) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                header = f"{kind} {prefix}{node.name}({ast.unparse(node.args)})"
            elif isinstance(node, ast.ClassDef):
                bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
                header = f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
            else:
                # Definitions under `if sys.platform == ...:` or `try:` at module/class level still count.
                visit((c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler))),
                      prefix)
                continue
            if doc := ast.get_docstring(node):
                blocks.append(f"{header}\n{doc}")
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, f"{module_name}.")
    return "\n\n".join(blocks)


class _HubSource(_Source):
    """A Hugging Face hub dataset (or one already in the local datasets cache)."""

    def __init__(self, name: str, text_field: str, split: str, config_name: str | None):
        import datasets

        self.description = name
        self.text_field = text_field
        try:
            self.dataset = datasets.load_dataset(name, config_name, split=split)
        except Exception as err:  # noqa: BLE001 - offline, unknown name, bad config: all end here
            first_line = (str(err).strip().splitlines() or [""])[0]
            # `from None`: the hub client's chained tracebacks bury the one line that matters.
            raise DataError(
                f"dataset {name!r} is not a local path and could not be loaded from the Hugging Face hub "
                f"(offline?): {type(err).__name__}: {first_line}"
            ) from None
        if text_field not in self.dataset.column_names:
            raise DataError(f"dataset {name!r} (split {split!r}) has no column {text_field!r} "
                            f"(columns: {self.dataset.column_names}); set text_field to the text column")
        self.config_name, self.split = config_name, split

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "hub", "name": self.description, "config_name": self.config_name, "split": self.split,
                "text_field": self.text_field, "dataset": self.dataset._fingerprint}

    def documents(self, counts: Counter) -> Iterator[Document]:
        column = self.dataset.select_columns([self.text_field])
        for start in range(0, len(column), 1024):
            texts = column[start:start + 1024][self.text_field]
            for index, text in enumerate(texts, start=start):
                where = f"dataset {self.description!r} row {index + 1}"
                yield Document(str(index), _check_text(text, where, self.text_field))


def _resolve_source(source: str, text_field: str, split: str, config_name: str | None) -> _Source:
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must be a non-empty string, got {text_field!r}")
    if source == "python-docs":
        if not PYTHON_DOCS_DIR.is_dir():
            raise FileNotFoundError(
                f"data source 'python-docs' reads Debian's python3.11-doc package, which is not installed "
                f"({PYTHON_DOCS_DIR} does not exist): run `apt-get install python3.11-doc`, or use "
                "source='stdlib-docstrings', which needs nothing installed"
            )
        return _FileSource(PYTHON_DOCS_DIR, text_field, "python-docs")
    if source == "stdlib-docstrings":
        return _StdlibSource()
    path = Path(source).expanduser()
    if path.exists():
        return _FileSource(path, text_field, source)
    if source.startswith(("/", ".", "~")) or source.lower().endswith(SUPPORTED_SUFFIXES):
        raise FileNotFoundError(f"data source {source!r} looks like a path, but {path} does not exist")
    return _HubSource(source, text_field, split, config_name)


def _read_text(path: Path, counts: Counter) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        logger.warning("%s is not valid UTF-8 (first bad byte at offset %d); decoding with replacement "
                       "characters", path, err.start)
        counts["invalid_utf8_files"] += 1
        return raw.decode("utf-8", errors="replace")


def _json_lines(path: Path, content: str) -> Iterator[tuple[int, Any]]:
    for line_number, line in enumerate(io.StringIO(content), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_number}: invalid JSON: {err.msg} (column {err.colno})") from None


def _check_text(text: Any, where: str, text_field: str) -> str:
    if text is None:
        raise DataError(f"{where}: field {text_field!r} is null; expected a string")
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(text).__name__}; expected a string")
    return text


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_FULL_DIGEST_BYTES = 2 << 30
_DIGEST_SAMPLES, _DIGEST_SAMPLE_BYTES = 64, 1 << 20


def content_digest(path: Path) -> str:
    """sha256 of a file's bytes, for cache keys: a copy, or a file reassembled from parts, is the same data, where an
    mtime would call it new (the GPU machine rebuilds the GGUF each session, so mtime-keyed teacher samples carried
    between sessions never matched). Files over 2 GiB: their size and 1 MiB at 64 evenly spaced offsets, head and
    tail included (a 140 GB checkpoint is keyed in well under a second; a rewrite that changes none of those bytes
    would be missed, and no real finetune does that)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_DIGEST_BYTES:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256(str(size).encode())
        for i in range(_DIGEST_SAMPLES):
            f.seek((size - _DIGEST_SAMPLE_BYTES) * i // (_DIGEST_SAMPLES - 1))
            h.update(f.read(_DIGEST_SAMPLE_BYTES))
        return h.hexdigest()


def relative_name(root: Path, path: Path) -> str:
    """`path`'s name under the folder `root`, or its file name when `root` is the file itself."""
    return path.name if path == root else path.relative_to(root).as_posix()


def files_digest(root: Path, files: list[Path]) -> str:
    """One digest of `files` (under the folder `root`, or `root` itself): each one's name under root, size and
    content digest, so a copy of the same files has the same digest and a file edited in place a new one."""
    return _digest([(relative_name(root, p), p.stat().st_size, content_digest(p)) for p in files])


# ----------------------------------------------------------------------------------------------------
# Documents


def load_documents(
    source: str,
    text_field: str = "text",
    split: str = "train",
    config_name: str | None = None,
    max_documents: int | None = None,
) -> list[Document]:
    """All non-empty documents of `source`, in the source's own deterministic order (sorted files, rows in
    file order, modules by name), at most `max_documents` of them (the first ones in that order).

    Raises:
        FileNotFoundError: a path that does not exist; python-docs when python3.11-doc is not installed.
        DataError: unreadable rows (naming file and 1-based row), an unsupported file, no documents at
            all, or a hub dataset that cannot be loaded.
    """
    documents, counts = _load_documents(_resolve_source(source, text_field, split, config_name), max_documents)
    if counts:
        logger.info("%s: %d documents; %s", source, len(documents), dict(counts))
    return documents


def _load_documents(src: _Source, max_documents: int | None) -> tuple[list[Document], Counter]:
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise DataError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    counts: Counter = Counter()
    documents = []
    for document in src.documents(counts):
        if not document.text.strip():
            counts["skipped_empty_documents"] += 1
            continue
        documents.append(document)
        if max_documents is not None and len(documents) >= max_documents:
            break
    if not documents:
        raise DataError(f"data source {src.description!r} has no non-empty documents ({dict(counts)})")
    return documents, counts


def split_documents(
    documents: Sequence[Document], eval_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split by document into (train, eval), each in input order.

    A document goes to eval when a hash of (seed, id) falls below `eval_fraction`, so its side depends only
    on its own id: adding or removing other documents never moves it. With >= 2 documents each side gets
    at least one (the document with the lowest / highest hash moves over if a side came out empty).

    Raises:
        DataError: `eval_fraction` outside (0, 1), fewer than 2 documents, or duplicate ids.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if len(documents) < 2:
        raise DataError(f"splitting into train and eval by document needs at least 2 documents, got "
                        f"{len(documents)}; add documents (or raise max_documents)")
    ids = [d.id for d in documents]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise DataError(f"document id {duplicate!r} appears more than once; ids must be unique")
    scores = [_unit_hash(f"{seed}\x00{d.id}") for d in documents]
    in_eval = [s < eval_fraction for s in scores]
    if not any(in_eval):
        in_eval[min(range(len(scores)), key=scores.__getitem__)] = True
    if all(in_eval):
        in_eval[max(range(len(scores)), key=scores.__getitem__)] = False
    train = [d for d, e in zip(documents, in_eval) if not e]
    eval_ = [d for d, e in zip(documents, in_eval) if e]
    return train, eval_


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64


# ----------------------------------------------------------------------------------------------------
# Tokenize and pack


def tokenize_documents(texts: Sequence[str], tokenizer: Any, show_progress: bool = True) -> list[list[int]]:
    """Token ids of each text (no special tokens), batch-encoded so a fast tokenizer runs in Rust."""
    ids: list[list[int]] = []
    total_chars = sum(len(t) for t in texts)
    # `delay`: the bar appears only when tokenizing takes longer than a couple of seconds.
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", delay=2.0,
              disable=not show_progress) as bar:
        for start in range(0, len(texts), _TOKENIZE_BATCH_DOCUMENTS):
            batch = list(texts[start:start + _TOKENIZE_BATCH_DOCUMENTS])
            # verbose=False: documents longer than the model's max length are expected (we pack them).
            encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
            ids.extend(encoded["input_ids"])
            bar.update(sum(len(t) for t in batch))
    return ids


def pack_token_ids(documents: Iterable[Sequence[int]], eos_token_id: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Concatenate documents, each followed by `eos_token_id`, and cut into rows of exactly `seq_len`.

    Returns (rows [N, seq_len] int32, number of tokens dropped from the ragged tail). A document may span
    two rows; eos after every document (the last too) marks each boundary the model sees.
    """
    pieces = [np.asarray(list(ids) + [eos_token_id], dtype=np.int64) for ids in documents]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() > np.iinfo(np.int32).max):
        raise DataError(f"token ids must lie in [0, 2**31), got range [{stream.min()}, {stream.max()}]")
    n_rows = stream.size // seq_len
    rows = torch.from_numpy(stream[: n_rows * seq_len].astype(np.int32)).view(n_rows, seq_len)
    return rows, int(stream.size - n_rows * seq_len)


# ----------------------------------------------------------------------------------------------------
# The whole pipeline, cached


_SETTINGS_DEFAULTS: dict[str, Any] = {
    "source": None, "text_field": "text", "split": "train", "config_name": None, "seq_len": None,
    "eval_fraction": 0.05, "max_documents": None, "cache_dir": None, "seed": 0,
    "mix": (), "repeat": True, "teacher_samples": None,
}


def _settings(cfg: Any) -> dict[str, Any]:
    """The data settings from a Mapping or any object with those attributes (DataConfig, a DictConfig).

    `seed` is the split seed. The config tree's DataConfig has none, so it defaults to 0: which documents
    are held out is a property of the data, not of the run, and runs with different run seeds stay
    comparable on the same eval set.
    """
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - set(_SETTINGS_DEFAULTS))
        if unknown:
            raise DataError(f"unknown data settings {unknown}; expected some of {sorted(_SETTINGS_DEFAULTS)}")
        settings = {name: cfg.get(name, default) for name, default in _SETTINGS_DEFAULTS.items()}
    else:
        settings = {name: getattr(cfg, name, default) for name, default in _SETTINGS_DEFAULTS.items()}
    if settings["source"] is None and not settings["mix"]:
        raise DataError("data settings have no `source` (nor a `mix`)")
    seq_len = settings["seq_len"]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(settings["seed"], int):
        raise DataError(f"seed must be an integer, got {settings['seed']!r}")
    settings["mix"] = _mix_entries(settings["mix"])
    settings["teacher_samples"] = _teacher_settings(settings["teacher_samples"], seq_len)
    return settings


def uses_teacher_samples(cfg: Any) -> bool:
    """Whether data settings (DataConfig or a mapping) read the teacher-samples source."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda name, default=None: getattr(cfg, name, default)
    mix = [dataclasses.asdict(e) if dataclasses.is_dataclass(e) else e for e in get("mix") or ()]
    return get("source") == TEACHER_SAMPLES or any(e.get("source") == TEACHER_SAMPLES for e in mix)


def _mix_entries(mix: Any) -> list[tuple[str, float]]:
    """(source, weight normalised to sum 1) per entry of `mix` (MixEntry objects or mappings)."""
    entries = []
    for i, entry in enumerate(mix or ()):
        values = dataclasses.asdict(entry) if dataclasses.is_dataclass(entry) else entry
        if not isinstance(values, Mapping) or set(values) - {"source", "weight"} or "source" not in values:
            raise DataError(f"mix[{i}] = {entry!r}: expected a mapping {{source: ..., weight: ...}}")
        weight = values.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight)
                                                                                   and weight > 0):
            raise DataError(f"mix[{i}].weight = {weight!r}: expected a positive finite share")
        entries.append((values["source"], float(weight)))
    if len(entries) == 1:
        raise DataError("mix has 1 entry; a mix needs at least 2 (for one source set `source`)")
    sources = [source for source, _ in entries]
    if len(set(sources)) != len(sources):
        raise DataError(f"mix names a source twice ({sources}); merge their weights")
    total = sum(weight for _, weight in entries)
    return [(source, weight / total) for source, weight in entries]


def _teacher_settings(values: Any, seq_len: int) -> TeacherSamplesConfig:
    """The teacher-samples settings, defaults filled and checked by the config tree's own rules."""
    if values is None:
        values = TeacherSamplesConfig()
    elif isinstance(values, Mapping):
        known = {f.name for f in dataclasses.fields(TeacherSamplesConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"unknown teacher_samples settings {unknown}; expected some of {sorted(known)}")
        values = TeacherSamplesConfig(**values)
    elif not isinstance(values, TeacherSamplesConfig):
        raise DataError(f"teacher_samples must be a mapping of settings, got {values!r}")
    try:
        check_teacher_samples(values, seq_len)
    except ConfigError as err:
        raise DataError(str(err)) from None
    return values


def default_cache_dir() -> Path:
    """``$KVFORGE_CACHE/data``, else ``~/.cache/kvforge/data``."""
    return Path(os.environ.get("KVFORGE_CACHE") or Path.home() / ".cache" / "kvforge").expanduser() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour: its class, vocabulary (every token and id) and the ids of a few
    probes. Not where it was loaded from: every run of a compressed model reads the same tokenizer from its own
    compressed_init folder, and a path in the key made each run resample its teacher samples (measured: 200 s
    per run on an H200)."""
    probes = tokenizer(list(_TOKENIZER_PROBES), add_special_tokens=False, return_attention_mask=False)
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocab": _digest(sorted(tokenizer.get_vocab().items())), "probes": _digest(probes["input_ids"])}


@dataclass(frozen=True)
class Teacher:
    """The model `teacher-samples` are sampled from: `identity` (what decides its weights: part of the cache
    key, known without loading it) and `load` (called only when the samples are not cached yet)."""

    identity: dict[str, Any]
    load: Callable[[], Any]


def build_packed_datasets(cfg: Any, tokenizer: Any, eos_token_id: int, *, show_progress: bool = True,
                          teacher: Teacher | None = None) -> PackedData:
    """Documents of ``cfg.source`` (or of each source of ``cfg.mix``) -> split by document -> tokenized and
    packed rows per split, cached; `teacher-samples` are sampled from `teacher` instead (see
    `teacher_sample_rows`).

    Args:
        cfg: a Mapping or an object with attributes source, seq_len (required), text_field, split,
            config_name, eval_fraction, max_documents, cache_dir, seed (split seed; see `_settings`), mix
            ([{source, weight}], >= 2 entries, replaces `source`), teacher_samples (TeacherSamplesConfig or a
            mapping of its fields).
        tokenizer: a Hugging Face tokenizer (fast ones encode in batches in Rust).
        eos_token_id: the id placed after every document (the caller decides which token marks an end); it
            also starts every teacher sample.
        show_progress: show a tqdm bar when tokenizing or sampling is slow.
        teacher: needed when a source is `teacher-samples`.

    Returns:
        PackedData with train/eval [N, seq_len] int32 and `stats` (documents, tokens, rows per split,
        skipped/ignored counts, cache_hit, cache_file, seconds); for a mix, `parts` and per-source stats.

    Raises:
        DataError: bad settings or data (see `load_documents`), a split too small for one row, or
            teacher-samples without a teacher.
        FileNotFoundError: see `load_documents`.
    """
    settings = _settings(cfg)
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < len(tokenizer):
        raise DataError(f"eos_token_id must be a token id in [0, {len(tokenizer)}), got {eos_token_id!r}")
    if not 0.0 < settings["eval_fraction"] < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {settings['eval_fraction']!r}")
    if not settings["mix"]:
        return _build_source(settings["source"], settings, tokenizer, eos_token_id, show_progress, teacher)
    parts = []
    for source, weight in settings["mix"]:
        try:
            parts.append((source, weight, _build_source(source, settings, tokenizer, eos_token_id, show_progress,
                                                        teacher)))
        except DataError as err:  # which entry of the mix failed is part of what the user must fix
            raise DataError(f"data.mix source {source!r}: {err}") from None
    return _combine(parts)


def _build_source(source: str, settings: dict[str, Any], tokenizer: Any, eos_token_id: int, show_progress: bool,
                  teacher: Teacher | None) -> PackedData:
    if source == TEACHER_SAMPLES:
        if teacher is None:
            raise DataError("data source 'teacher-samples' is sampled from the original model, but no teacher was "
                            "given (build_packed_datasets(..., teacher=Teacher(identity, load)))")
        return _teacher_samples_packed(settings, tokenizer, eos_token_id, teacher, show_progress)
    return _documents_packed(source, settings, tokenizer, eos_token_id, show_progress)


def _documents_packed(source: str, settings: dict[str, Any], tokenizer: Any, eos_token_id: int,
                      show_progress: bool) -> PackedData:
    seq_len, seed = settings["seq_len"], settings["seed"]
    started = time.perf_counter()
    src = _resolve_source(source, settings["text_field"], settings["split"], settings["config_name"])

    key_material = {
        "data_version": DATA_VERSION, "source": src.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos_token_id": eos_token_id, "seq_len": seq_len, "eval_fraction": settings["eval_fraction"],
        "max_documents": settings["max_documents"], "seed": seed,
    }
    key = _digest(key_material)
    cache_dir = Path(settings["cache_dir"]).expanduser() if settings["cache_dir"] else default_cache_dir()
    cache_file = cache_dir / f"{key[:32]}.pt"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        cached.stats.update(cache_hit=True, cache_file=str(cache_file),
                            seconds=round(time.perf_counter() - started, 3))
        return cached

    documents, counts = _load_documents(src, settings["max_documents"])
    train_docs, eval_docs = split_documents(documents, settings["eval_fraction"], seed)
    stats: dict[str, Any] = {"source": src.description, "skipped_empty_documents": 0,
                             "skipped_unparsable_files": 0, "ignored_files": 0, "invalid_utf8_files": 0,
                             **counts}
    tokenize_started = time.perf_counter()
    packed = {}
    for split_name, docs in (("train", train_docs), ("eval", eval_docs)):
        ids = tokenize_documents([d.text for d in docs], tokenizer, show_progress)
        rows, dropped = pack_token_ids(ids, eos_token_id, seq_len)
        tokens = sum(len(i) + 1 for i in ids)
        if rows.shape[0] == 0:
            raise DataError(
                f"the {split_name} split of {src.description!r} has {tokens} tokens ({len(docs)} documents, "
                f"eos included) but one row of seq_len={seq_len} needs {seq_len}; lower seq_len, add data"
                + (", or raise eval_fraction" if split_name == "eval" else "")
            )
        packed[split_name] = rows
        stats.update({f"{split_name}_documents": len(docs), f"{split_name}_tokens": tokens,
                      f"{split_name}_rows": rows.shape[0], f"{split_name}_dropped_tail_tokens": dropped})
    stats["tokenize_seconds"] = round(time.perf_counter() - tokenize_started, 3)
    result = PackedData(packed["train"], packed["eval"], stats)
    _write_cache(cache_file, key, key_material, result)
    stats.update(cache_hit=False, cache_file=str(cache_file), seconds=round(time.perf_counter() - started, 3))
    logger.info("data %s: %s", src.description, stats)
    return result


def _read_cache(path: Path, key: str) -> PackedData | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] != key:
            raise ValueError(f"key {blob['key'][:12]}... != {key[:12]}...")
        return PackedData(blob["train"], blob["eval"], dict(blob["stats"]))
    except Exception as err:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, err)
        return None


def _write_cache(path: Path, key: str, key_material: dict, data: PackedData) -> None:
    blob = {"key": key, "key_material": json.dumps(key_material, sort_keys=True, default=str),
            "train": data.train, "eval": data.eval, "stats": data.stats}
    with atomic.file(path) as tmp:  # concurrent ranks each write their own temporary file; the last rename wins
        torch.save(blob, tmp)


# ----------------------------------------------------------------------------------------------------
# Teacher samples: a training corpus the original model writes itself

# Bump when sampling changes what a given cache key holds.
TEACHER_SAMPLES_VERSION = 2  # 2: batches grouped by prompt length; the static engine


def teacher_identity(model_cfg: Any, run_seed: int) -> dict[str, Any]:
    """What decides the teacher's weights, without loading it: the config tree's `model` section (name, GGUF
    file, init, overrides, dtype), the run seed for a random init (train.py seeds the teacher with it), and for
    a local directory or file the sizes and content digests of its files, so a checkpoint rewritten in place is new
    and a copy of the same one is not."""
    fields = ("name", "gguf_file", "init", "config", "dtype")
    identity = {f: (dict(getattr(model_cfg, f)) if f == "config" else getattr(model_cfg, f, None)) for f in fields}
    if identity["init"] == "random":
        identity["seed"] = run_seed
    path = Path(str(identity["name"])).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        identity["files"] = files_digest(path, files)
    return identity


_NUCLEUS_CANDIDATES = 1024


class _SampleWarper:
    """Per-sample temperature, then nucleus (top-p) filtering, then banned tokens, on [B, V] scores.

    generate() takes one temperature per call; scaling each row by its own temperature here lets one batch
    hold the whole temperature range. The order (temperature before top-p) is the one transformers uses.
    """

    def __init__(self, temperatures_B: torch.Tensor, top_p: float, banned: Sequence[int],
                 forced_BF: torch.Tensor | None = None):
        self.temperatures_B1 = temperatures_B[:, None]
        self.top_p = top_p
        self.banned = list(banned)
        # forced_BF[b, t] >= 0: the t-th generated token of row b is that token, not a draw (a prompt of its own
        # length fed through the decode steps, so rows of different prompt lengths share a batch unpadded).
        self.forced_BF = forced_BF
        self.step = 0  # calls so far: one per generated token

    def __call__(self, input_ids: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        scores_BV = scores_BV.float() / self.temperatures_B1.to(scores_BV.device)
        if self.banned:
            scores_BV[:, self.banned] = -math.inf
        if self.top_p < 1.0:
            scores_BV = self._nucleus(scores_BV)
        if self.forced_BF is not None and self.step < self.forced_BF.shape[1]:
            token_B = self.forced_BF[:, self.step].to(scores_BV.device)
            rows_R = (token_B >= 0).nonzero()[:, 0]
            scores_BV[rows_R] = -math.inf
            scores_BV[rows_R, token_B[rows_R]] = 0.0
        self.step += 1
        return scores_BV

    def _nucleus(self, scores_BV: torch.Tensor) -> torch.Tensor:
        """Keep the tokens whose more likely tokens hold less than top_p of the probability (the most likely
        always): the smallest set that reaches top_p. A trained model's nucleus is a few hundred tokens at most,
        so the top _NUCLEUS_CANDIDATES are sorted, not the whole vocabulary (a full sort of 49k scores per row
        was most of a CPU sampling step); only the rows whose candidates fall short of top_p take the full sort
        (one such row at temperature 1 made every row of a 1,024-row batch sort: 3.5 ms of a 35 ms GPU step)."""
        k = min(_NUCLEUS_CANDIDATES, scores_BV.shape[-1])
        top_BK, index_BK = scores_BV.topk(k, dim=-1)  # descending
        probs_BK = (top_BK - scores_BV.logsumexp(dim=-1, keepdim=True)).exp()
        warped_BV, short_B = self._keep_nucleus(top_BK, index_BK, probs_BK, scores_BV.shape[-1])
        short_R = short_B.nonzero()[:, 0]
        if len(short_R):
            top_RV, index_RV = scores_BV[short_R].sort(dim=-1, descending=True)
            warped_BV[short_R] = self._keep_nucleus(top_RV, index_RV, top_RV.softmax(dim=-1), scores_BV.shape[-1])[0]
        return warped_BV

    def _keep_nucleus(self, top_RK, index_RK, probs_RK, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [R, vocab] keeping the nucleus among candidates sorted by score (descending, with their
        probabilities), -inf elsewhere; and which rows' candidates fall short of top_p [R]."""
        cumulative_RK = probs_RK.cumsum(dim=-1)
        keep_RK = cumulative_RK - probs_RK < self.top_p
        warped_RV = top_RK.new_full((top_RK.shape[0], vocab), -math.inf).scatter_(
            1, index_RK, top_RK.masked_fill(~keep_RK, -math.inf))
        return warped_RV, cumulative_RK[:, -1] < self.top_p


def _generation_dtype(setting: str, model: Any) -> torch.dtype:
    if setting == "auto":
        device = next(model.parameters()).device
        return torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]


def _static_sampler(model: Any, ts: TeacherSamplesConfig, sample_len: int) -> Any:
    """kvforge's static-cache sampler for `ts.engine` (auto: when the model is supported), or None for generate()."""
    from .sampling import StaticCacheSampler, unsupported_reason

    if ts.engine == "generate":
        return None
    reason = unsupported_reason(model, sample_len)
    if reason is not None:
        if ts.engine == "static":
            raise DataError(f"data.teacher_samples.engine = 'static' cannot sample from this teacher: {reason}; "
                            "use engine: generate (or auto)")
        logger.info("teacher-samples: generate() samples (the static engine does not fit: %s)", reason)
        return None
    return StaticCacheSampler(model, ts.batch_size, sample_len, attention=ts.attention)


def teacher_sample_rows(model: Any, ts: TeacherSamplesConfig, n_samples: int, sample_len: int, separator_id: int,
                        prefixes: Sequence[np.ndarray] = (), show_progress: bool = True,
                        instructions: Sequence[np.ndarray] = ()) -> tuple[torch.Tensor, dict[str, Any]]:
    """`n_samples` samples of exactly `sample_len` tokens from `model`: [n_samples, sample_len] int32, and stats.

    Every sample starts with `separator_id` (the token between documents, so the model starts a new document);
    a `ts.prefix_fraction` of them continue a window of `ts.prefix_tokens` tokens of one of `prefixes` (token id
    arrays of real text) at a random offset, and a `ts.instruction_fraction` of them continue one of
    `instructions` (token ids of a chat-formatted request, fed through the first decode steps). Sampling: each
    sample's temperature uniform in [ts.temperature_min, ts.temperature_max], then top_p; `ts.suppress_eos` bans
    the separator and the model's eos, else the model may end a document and begin the next one inside a sample,
    as packed text does.

    Deterministic for `ts.seed` (and `ts.batch_size`, `ts.dtype`) on CPU: what each sample gets comes from one
    numpy generator, and generate() runs under a torch RNG seeded per batch, inside `fork_rng` so the caller's RNG
    is left as it was. On a GPU, CUDA kernels are not bitwise deterministic and a resampling can differ (seen on
    an H200); the cache is what makes reruns and ranks read the same tokens.
    """
    from transformers import GenerationConfig

    dtype = _generation_dtype(ts.dtype, model)
    device = next(model.parameters()).device
    # A lower-precision copy for sampling; the teacher itself stays as distillation needs it.
    sampler = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    was_training = sampler.training
    sampler.eval()
    rng = np.random.default_rng(ts.seed)
    temperatures = rng.uniform(ts.temperature_min, ts.temperature_max, size=n_samples)
    prefixed = rng.random(n_samples) < ts.prefix_fraction if len(prefixes) else np.zeros(n_samples, dtype=bool)
    documents = rng.integers(0, max(1, len(prefixes)), size=n_samples)
    offsets = rng.random(n_samples)
    # Drawn after the prefix draws, so settings without instructions sample what they sampled before.
    instructed = ~prefixed & (rng.random(n_samples) * (1 - ts.prefix_fraction) < ts.instruction_fraction) \
        if len(instructions) else np.zeros(n_samples, dtype=bool)
    chosen = rng.integers(0, max(1, len(instructions)), size=n_samples)
    longest = max((len(instructions[i]) for i in chosen[instructed]), default=0)
    if longest > sample_len - 2:
        raise DataError(f"an instruction of {longest} tokens leaves no room to generate in a sample of {sample_len} "
                        "tokens; raise data.teacher_samples.sample_len or shorten the instructions")
    banned = set()
    if ts.suppress_eos:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        banned = {separator_id, *(eos if isinstance(eos, list) else [] if eos is None else [eos])}

    def prompt(i: int) -> list[int]:
        if not prefixed[i]:
            return [separator_id]
        tokens = prefixes[documents[i]]
        start = int(offsets[i] * (len(tokens) - ts.prefix_tokens + 1))
        return [separator_id, *tokens[start:start + ts.prefix_tokens].tolist()]

    samples = torch.empty(n_samples, sample_len, dtype=torch.int32)
    # Batches hold prompts of one length (prefixed ones first), so no row is padded and, in the static engine,
    # every row sits at the same position.
    batches = [group[first:first + ts.batch_size] for group in (np.flatnonzero(prefixed), np.flatnonzero(~prefixed))
               for first in range(0, len(group), ts.batch_size)]
    static = _static_sampler(sampler, ts, sample_len)
    started = time.perf_counter()
    generated_tokens = 0
    forked = [device] if device.type == "cuda" else []
    with torch.no_grad(), tqdm(total=n_samples * sample_len, unit="tok", unit_scale=True, desc="teacher samples",
                               delay=2.0, disable=not show_progress) as bar:
        for batch, indices in enumerate(batches):
            prompt_BP = torch.tensor([prompt(i) for i in indices], device=device)
            new_tokens = sample_len - prompt_BP.shape[1]
            forced = {row: instructions[chosen[i]] for row, i in enumerate(indices) if instructed[i]}
            forced_BF = None
            if forced:
                forced_BF = torch.full((len(indices), max(map(len, forced.values()))), -1, dtype=torch.long)
                for row, request in forced.items():
                    forced_BF[row, :len(request)] = torch.from_numpy(request)
            warper = _SampleWarper(torch.tensor(temperatures[indices], dtype=torch.float32), ts.top_p, sorted(banned),
                                   forced_BF)
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(int(_unit_hash(f"teacher-samples\x00{ts.seed}\x00{batch}") * 2**62))
                if static is not None:
                    output_BL = static.sample(prompt_BP, new_tokens, lambda scores: warper(None, scores))
                else:
                    config = GenerationConfig(
                        do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        # Our warper does temperature and top-p; transformers' own (and the model's defaults) off.
                        temperature=1.0, top_p=1.0, top_k=0,
                        # No eos: generation never stops early; a sampled separator starts the next document.
                        eos_token_id=[], pad_token_id=separator_id)
                    output_BL = sampler.generate(input_ids=prompt_BP, attention_mask=torch.ones_like(prompt_BP),
                                                 generation_config=config, logits_processor=[warper])
            if output_BL.shape[1] != sample_len:
                raise RuntimeError(f"the sampler returned {output_BL.shape[1]} tokens per sample, expected {sample_len}")
            samples[torch.from_numpy(indices)] = output_BL.to("cpu", torch.int32)
            generated_tokens += new_tokens * len(indices)
            bar.update(len(indices) * sample_len)
    sampler.train(was_training)
    seconds = time.perf_counter() - started
    stats = {"samples": n_samples, "sample_len": sample_len, "prefixed_samples": int(prefixed.sum()),
             "instructed_samples": int(instructed.sum()),
             "sampled_separators": int((samples[:, 1:] == separator_id).sum()),
             "sample_dtype": str(dtype).split(".")[-1], "engine": "generate" if static is None else "static",
             "sample_seconds": round(seconds, 3),
             "sample_tokens_per_s": round(generated_tokens / seconds, 1) if seconds > 0 else None}
    return samples, stats


def instruction_prompts(ts: TeacherSamplesConfig, tokenizer: Any) -> list[np.ndarray]:
    """Token ids of each instruction as the tokenizer's chat template frames a user's request, up to where the
    assistant's answer begins (the file's lines, or the built-in tasks x topics).

    Raises:
        DataError: the tokenizer has no chat template (a base model, which follows no instructions), or the
            file holds no instruction.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.teacher_samples.instruction_fraction = {ts.instruction_fraction} needs a tokenizer "
                        f"with a chat template (an instruct model); {type(tokenizer).__name__} "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has none: set instruction_fraction to 0")
    if ts.instructions is None:
        texts = builtin_instructions()
    else:
        path = Path(ts.instructions).expanduser()
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise DataError(f"data.teacher_samples.instructions = {ts.instructions!r}: the file holds no instruction "
                            "(expected one per line)")
    prompts = []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids  # transformers 5 returns a BatchEncoding
        prompts.append(np.asarray(ids, dtype=np.int64))
    return prompts


def _prefix_pool(src: _Source, settings: dict[str, Any], tokenizer: Any, min_tokens: int,
                 show_progress: bool) -> list[np.ndarray]:
    """Token ids of the train-split documents of `src` that hold at least `min_tokens` tokens (the same split
    as training on that source uses, so no eval text leaks into the samples)."""
    documents, _ = _load_documents(src, settings["max_documents"])
    train_docs, _ = split_documents(documents, settings["eval_fraction"], settings["seed"])
    ids = tokenize_documents([d.text for d in train_docs], tokenizer, show_progress)
    pool = [np.asarray(i, dtype=np.int64) for i in ids if len(i) >= min_tokens]
    if not pool:
        raise DataError(f"teacher_samples.prefix_source {src.description!r} has no train document of at least "
                        f"{min_tokens} tokens; lower teacher_samples.prefix_tokens or choose another prefix_source")
    return pool


def _teacher_samples_packed(settings: dict[str, Any], tokenizer: Any, separator_id: int, teacher: Teacher,
                            show_progress: bool) -> PackedData:
    """The `teacher-samples` source: samples from the cache, or sampled now and cached; packed into rows.

    Samples are iid, so the split is by sample: the last ceil(eval_fraction * n) samples (at least one row's
    worth) are eval. The cache holds samples, not rows, so another seq_len or eval_fraction reuses them.
    """
    ts: TeacherSamplesConfig = settings["teacher_samples"]
    seq_len = settings["seq_len"]
    sample_len = ts.sample_len or seq_len
    n_samples = -(-ts.tokens // sample_len)
    per_row = -(-seq_len // sample_len)
    n_eval = max(math.ceil(n_samples * settings["eval_fraction"]), per_row)
    if n_samples - n_eval < per_row:
        raise DataError(f"teacher_samples.tokens = {ts.tokens} gives {n_samples} samples of {sample_len} tokens, but "
                        f"one train row and one eval row of seq_len={seq_len} need {2 * per_row * sample_len} "
                        "tokens; raise teacher_samples.tokens")
    started = time.perf_counter()
    prefix_src = None
    if ts.prefix_fraction > 0:
        prefix_src = _resolve_source(ts.prefix_source, settings["text_field"], settings["split"],
                                     settings["config_name"])
    key_material = {
        "version": TEACHER_SAMPLES_VERSION, "teacher": teacher.identity, "tokenizer": tokenizer_fingerprint(tokenizer),
        "separator_id": separator_id, "samples": n_samples, "sample_len": sample_len,
        "settings": without_unused_instructions({k: v for k, v in dataclasses.asdict(ts).items()
                                                 if k not in ("tokens", "sample_len", "attention")}),
        # The prefix pool depends on the prefix source, its split and how much of it is read.
        "prefixes": None if prefix_src is None else {
            "source": prefix_src.fingerprint(), "eval_fraction": settings["eval_fraction"], "seed": settings["seed"],
            "max_documents": settings["max_documents"], "text_field": settings["text_field"],
            "split": settings["split"], "config_name": settings["config_name"]},
    }
    instructions = instruction_prompts(ts, tokenizer) if ts.instruction_fraction > 0 else []
    if instructions:  # what the teacher is asked, as tokens: the instructions and the chat template together
        key_material["instructions"] = _digest([i.tolist() for i in instructions])
    cache_dir = Path(settings["cache_dir"]).expanduser() if settings["cache_dir"] else default_cache_dir()
    folder = cache_dir / f"teacher-samples-{_digest(key_material)[:32]}"
    samples, stats = _read_teacher_samples(folder, key_material)
    if samples is None:
        prefixes = [] if prefix_src is None else _prefix_pool(prefix_src, settings, tokenizer, ts.prefix_tokens,
                                                              show_progress)
        model = teacher.load()
        samples, stats = teacher_sample_rows(model, ts, n_samples, sample_len, separator_id, prefixes, show_progress,
                                             instructions)
        del model
        with atomic.directory(folder) as tmp:
            torch.save({"samples": samples, "stats": stats}, tmp / "samples.pt")
            (tmp / "key.json").write_text(json.dumps(key_material, sort_keys=True, default=str, indent=1))
        stats = {**stats, "cache_hit": False}
        logger.info("teacher-samples: sampled %d x %d tokens in %.1f s (%s tokens/s), cached in %s", n_samples,
                    sample_len, stats["sample_seconds"], stats["sample_tokens_per_s"], folder)
    else:
        stats = {**stats, "cache_hit": True}
    packed, counts = {}, {}
    for name, part in (("train", samples[:n_samples - n_eval]), ("eval", samples[n_samples - n_eval:])):
        stream = part.reshape(-1)
        n_rows = stream.numel() // seq_len
        packed[name] = stream[:n_rows * seq_len].reshape(n_rows, seq_len).clone()
        counts.update({f"{name}_samples": part.shape[0], f"{name}_tokens": stream.numel(), f"{name}_rows": n_rows,
                       f"{name}_dropped_tail_tokens": stream.numel() - n_rows * seq_len})
    stats = {"source": TEACHER_SAMPLES, **stats, **counts, "cache_file": str(folder),
             "seconds": round(time.perf_counter() - started, 3)}
    return PackedData(packed["train"], packed["eval"], stats)


def _read_teacher_samples(folder: Path, key_material: dict) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Cached samples, or (None, {}) when there are none or they do not match (a damaged cache is resampled)."""
    if not (folder / "samples.pt").is_file():
        return None, {}
    try:
        # The folder is named by a prefix of the key's hash; the whole key must match.
        if json.loads((folder / "key.json").read_text()) != json.loads(json.dumps(key_material, default=str)):
            raise ValueError("key.json does not match the settings")
        blob = torch.load(folder / "samples.pt", map_location="cpu", weights_only=True)
        samples = blob["samples"]
        expected = (key_material["samples"], key_material["sample_len"])
        if samples.dtype != torch.int32 or tuple(samples.shape) != expected:
            raise ValueError(f"samples have shape {tuple(samples.shape)} and dtype {samples.dtype}")
        return samples, dict(blob["stats"])
    except Exception as err:  # noqa: BLE001 - a damaged cache is resampled, never fatal
        logger.warning("ignoring unreadable teacher-samples cache %s (%s); sampling again", folder, err)
        return None, {}


# ----------------------------------------------------------------------------------------------------
# Mixing sources


def _combine(parts: Sequence[tuple[str, float, PackedData]]) -> PackedData:
    """One PackedData from several sources: their training rows one after another (`parts` says where), and
    their eval rows interleaved by weight (row j of source s sorts at (j + 0.5) / weight_s), so the first eval
    batches -- all that `training.eval_batches` may read -- hold the sources in the proportions of training."""
    trains, evals, keys, layout, start = [], [], [], [], 0
    for source, weight, data in parts:
        trains.append(data.train)
        evals.append(data.eval)
        keys.append((np.arange(data.eval.shape[0]) + 0.5) / weight)
        layout.append(SourcePart(source, weight, start, start + data.train.shape[0]))
        start += data.train.shape[0]
    order = torch.from_numpy(np.argsort(np.concatenate(keys), kind="stable"))
    stats = {"sources": {source: data.stats for source, _, data in parts},
             "mix": {source: round(weight, 6) for source, weight, _ in parts},
             "train_rows": start, "eval_rows": sum(e.shape[0] for e in evals)}
    return PackedData(torch.cat(trains), torch.cat(evals)[order], stats, tuple(layout))


def _mix_counts(weights: Sequence[float], positions: np.ndarray) -> np.ndarray:
    """[S, len(positions)]: how many of the first P rows of the mixed stream come from each source, per P.

    Source s takes round(q_s * rest_s) of the rows the sources before it left, with q_s = w_s / (w_s + ...
    + w_last): each count is within one row or so of w_s * P for every P, grows by 0 or 1 per row, and the
    counts add up to P -- so every row has exactly one source, and no step depends on the run's length (a
    resumed or longer run reads the same rows at the same steps).
    """
    rest = positions.astype(np.int64)
    counts = []
    for s, weight in enumerate(weights[:-1]):
        share = weight / sum(weights[s:])
        count = np.floor(share * rest + 0.5).astype(np.int64)
        counts.append(count)
        rest = rest - count
    counts.append(rest)
    return np.stack(counts)


def _check_batch_args(n_rows: int, seq_len: int, rank: int, world_size: int, micro_batch_size: int, step: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if micro_batch_size < 1 or step < 0:
        raise DataError(f"micro_batch_size must be >= 1 and step >= 0, got {micro_batch_size} and {step}")
    rows_per_step = world_size * micro_batch_size
    if n_rows < rows_per_step:
        raise DataError(
            f"the training set has {n_rows} rows ({n_rows * seq_len} tokens) but one step over "
            f"world_size={world_size} ranks with micro_batch_size={micro_batch_size} needs {rows_per_step} "
            f"rows ({rows_per_step * seq_len} tokens); add data, or lower seq_len or micro_batch_size"
        )
    return rows_per_step


def train_batch(packed: PackedData, step: int, rank: int, world_size: int, micro_batch_size: int,
                seed: int) -> torch.Tensor:
    """The rows rank `rank` trains on at global micro-step `step`: [micro_batch_size, seq_len] int64.

    One source: `micro_batch` (epochs are permutations of all rows). A mix: the mixed stream's rows
    step * world_size * micro_batch_size ... + world_size * micro_batch_size - 1 come from the sources as
    `_mix_counts` says; the k-th row a source gives is row k mod N_s of that source's permutation for epoch
    k // N_s (a source read past its end starts a new permutation, mid-step if need be). The step's rows are
    dealt to the ranks in a seeded order, so no rank reads one source only. A function of the step alone, as
    `micro_batch`: resuming at step k reads what an uninterrupted run would.

    Raises:
        DataError: fewer training rows than one step needs, or a bad rank/step/size.
    """
    if not packed.parts:
        return micro_batch(packed.train, step, rank, world_size, micro_batch_size, seed)
    rows_per_step = _check_batch_args(packed.train.shape[0], packed.train.shape[1], rank, world_size,
                                      micro_batch_size, step)
    first = step * rows_per_step
    counts_SP = _mix_counts([p.weight for p in packed.parts], np.arange(first, first + rows_per_step + 1))
    source_B = np.diff(counts_SP, axis=1).argmax(axis=0)           # which source each of the step's rows is from
    index_B = counts_SP[source_B, np.arange(rows_per_step)]        # ... and how many it gave before it
    deal = _epoch_permutation(rows_per_step, f"{seed}\x00deal", step)
    rows = []
    for slot in deal[rank * micro_batch_size:(rank + 1) * micro_batch_size].tolist():
        part = packed.parts[source_B[slot]]
        epoch, k = divmod(int(index_B[slot]), part.rows)
        rows.append(part.start + int(_epoch_permutation(part.rows, f"{seed}\x00{part.source}", epoch)[k]))
    return packed.train[rows].long()


def source_epochs(packed: PackedData, micro_steps: int, world_size: int, micro_batch_size: int) -> dict[str, float]:
    """How many times a run of `micro_steps` global micro-steps reads each source (rows read / rows held).

    One source: the passes `micro_batch` makes (an epoch is N // (world_size * micro_batch_size) steps).
    """
    rows_per_step = world_size * micro_batch_size
    if not packed.parts:
        steps_per_epoch = packed.train.shape[0] // rows_per_step
        if steps_per_epoch == 0:
            _check_batch_args(packed.train.shape[0], packed.train.shape[1], 0, world_size, micro_batch_size, 0)
        return {str(packed.stats.get("source", "data")): micro_steps / steps_per_epoch}
    read_S = _mix_counts([p.weight for p in packed.parts], np.array([micro_steps * rows_per_step]))[:, 0]
    return {part.source: int(read) / part.rows for part, read in zip(packed.parts, read_S)}


def check_epochs(epochs: Mapping[str, float], repeat: bool, steps: int) -> str:
    """A line that says how many times a run of `steps` optimizer steps reads each source and which repeat.

    Raises:
        DataError: a source is read more than once and `repeat` is false (data.repeat).
    """
    repeated = {source: e for source, e in epochs.items() if e > 1 + 1e-9}
    line = describe_epochs(epochs, planned=True, steps=steps)
    if repeated and not repeat:
        names = ", ".join(f"{source!r} {e:.2f} times" for source, e in repeated.items())
        raise DataError(f"{steps} steps would read {names}, and data.repeat=false forbids reading a source more "
                        "than once: add data (teacher_samples.tokens, a larger source), lower training.max_steps, "
                        "or set data.repeat=true")
    return line


def describe_epochs(epochs: Mapping[str, float], *, planned: bool, steps: int) -> str:
    reads = ", ".join(f"{source} {e:.3g} times" for source, e in epochs.items())
    repeated = [source for source, e in epochs.items() if e > 1 + 1e-9]
    verb = "will read" if planned else "read"
    tail = (f"; REPEATED (epochs > 1): {', '.join(repeated)}" if repeated else "; no source repeats")
    return f"data: {steps} steps {verb} {reads}{tail}"


def epoch_metrics(epochs: Mapping[str, float]) -> dict[str, float]:
    """data/epochs/<source> per source (a path is named by its last part) and data/repeated_sources."""
    metrics = {f"data/epochs/{_label(source)}": e for source, e in epochs.items()}
    metrics["data/repeated_sources"] = sum(e > 1 + 1e-9 for e in epochs.values())
    return metrics


def _label(source: str) -> str:
    return Path(source).name if ("/" in source or source.startswith("~")) and Path(source).name else source


# ----------------------------------------------------------------------------------------------------
# Batches


def micro_batch(
    rows: torch.Tensor, step: int, rank: int, world_size: int, micro_batch_size: int, seed: int
) -> torch.Tensor:
    """The rows rank `rank` trains on at global micro-step `step`: [micro_batch_size, seq_len] int64.

    Order: each epoch is a permutation of all N rows drawn from (seed, epoch). An epoch has
    N // (world_size * micro_batch_size) steps; step s reads perm[(s' * world_size + rank) * mbs : + mbs]
    with s' = s mod steps_per_epoch. The N mod (world_size * mbs) rows at the end of an epoch's permutation
    are not read in that epoch (a different, random few each epoch), so no step straddles two epochs, no
    rank ever gets a short batch, and ranks never share a row within an epoch.

    The data position is this one integer: a run resumed at step k reads exactly what an uninterrupted one
    would have, provided world_size and micro_batch_size are unchanged (they define the mapping).

    Raises:
        DataError: fewer than world_size * micro_batch_size rows, or a bad rank/step/size.
    """
    if rows.ndim != 2:
        raise DataError(f"rows must be [N, seq_len], got shape {tuple(rows.shape)}")
    n_rows, seq_len = rows.shape
    rows_per_step = _check_batch_args(n_rows, seq_len, rank, world_size, micro_batch_size, step)
    steps_per_epoch = n_rows // rows_per_step
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    start = (step_in_epoch * world_size + rank) * micro_batch_size
    index = _epoch_permutation(n_rows, seed, epoch)[start:start + micro_batch_size]
    return rows[index].long()


@lru_cache(maxsize=16)
def _epoch_permutation(n_rows: int, seed: int | str, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(_unit_hash(f"epoch\x00{seed}\x00{epoch}") * 2**62))
    return torch.randperm(n_rows, generator=generator)


def eval_batches(
    rows: torch.Tensor, rank: int, world_size: int, micro_batch_size: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Rank `rank`'s share of the eval rows, in order, as [<= micro_batch_size, seq_len] int64 batches.

    Rows are first cut to a multiple of world_size (at most world_size - 1 dropped) so every rank runs the
    same number of batches of the same sizes (ZeRO-3 needs every rank in every forward); rank r gets rows
    r::world_size. Only the last batch may be shorter than micro_batch_size. At most `max_batches` batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    usable = rows.shape[0] // world_size * world_size
    if usable == 0:
        raise DataError(f"the eval set has {rows.shape[0]} rows, fewer than world_size={world_size}; "
                        "raise eval_fraction or lower seq_len")
    mine = rows[:usable][rank::world_size]
    n_batches = -(-mine.shape[0] // micro_batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield mine[b * micro_batch_size:(b + 1) * micro_batch_size].long()
