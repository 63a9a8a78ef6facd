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
import hashlib
import io
import json
import logging
import os
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

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


@dataclass
class PackedData:
    """train, eval: [N, seq_len] int32 token ids (documents joined by eos, ragged tail dropped).
    stats: flat counts (documents, tokens, rows per split; skipped/ignored counts; cache info)."""

    train: torch.Tensor
    eval: torch.Tensor
    stats: dict[str, Any]


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
            self.files.sort(key=self._relative)
            if not self.files:
                raise DataError(
                    f"folder {root} contains no {'/'.join(SUPPORTED_SUFFIXES)} files"
                    f" ({len(self.ignored)} other files ignored)"
                )

    def _relative(self, path: Path) -> str:
        return path.name if path == self.root else path.relative_to(self.root).as_posix()

    def fingerprint(self) -> dict[str, Any]:
        listing = []
        for path in self.files:
            st = path.stat()
            listing.append((self._relative(path), st.st_size, st.st_mtime_ns))
        return {"kind": "files", "root": str(self.root.resolve()), "text_field": self.text_field,
                "files": _digest(listing)}

    def documents(self, counts: Counter) -> Iterator[Document]:
        if self.ignored:
            counts["ignored_files"] += len(self.ignored)
        for path in self.files:
            rel = self._relative(path)
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
    if settings["source"] is None:
        raise DataError("data settings have no `source`")
    seq_len = settings["seq_len"]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(settings["seed"], int):
        raise DataError(f"seed must be an integer, got {settings['seed']!r}")
    return settings


def default_cache_dir() -> Path:
    """``$KVFORGE_CACHE/data``, else ``~/.cache/kvforge/data``."""
    return Path(os.environ.get("KVFORGE_CACHE") or Path.home() / ".cache" / "kvforge").expanduser() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour: its name, vocabulary size and the ids of a few probes."""
    probes = tokenizer(list(_TOKENIZER_PROBES), add_special_tokens=False, return_attention_mask=False)
    return {"name": getattr(tokenizer, "name_or_path", ""), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "probes": _digest(probes["input_ids"])}


def build_packed_datasets(cfg: Any, tokenizer: Any, eos_token_id: int, *, show_progress: bool = True) -> PackedData:
    """Documents of ``cfg.source`` -> split by document -> tokenized and packed rows per split, cached.

    Args:
        cfg: a Mapping or an object with attributes source, seq_len (required), text_field, split,
            config_name, eval_fraction, max_documents, cache_dir, seed (split seed; see `_settings`).
        tokenizer: a Hugging Face tokenizer (fast ones encode in batches in Rust).
        eos_token_id: the id placed after every document (the caller decides which token marks an end).
        show_progress: show a tqdm bar when tokenizing is slow.

    Returns:
        PackedData with train/eval [N, seq_len] int32 and `stats` (documents, tokens, rows per split,
        skipped/ignored counts, cache_hit, cache_file, seconds).

    Raises:
        DataError: bad settings or data (see `load_documents`), or a split too small for one row.
        FileNotFoundError: see `load_documents`.
    """
    settings = _settings(cfg)
    seq_len, seed = settings["seq_len"], settings["seed"]
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < len(tokenizer):
        raise DataError(f"eos_token_id must be a token id in [0, {len(tokenizer)}), got {eos_token_id!r}")
    if not 0.0 < settings["eval_fraction"] < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {settings['eval_fraction']!r}")
    started = time.perf_counter()
    src = _resolve_source(settings["source"], settings["text_field"], settings["split"], settings["config_name"])

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    blob = {"key": key, "key_material": json.dumps(key_material, sort_keys=True, default=str),
            "train": data.train, "eval": data.eval, "stats": data.stats}
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: concurrent ranks each write their own tmp; the last rename wins
    finally:
        tmp.unlink(missing_ok=True)


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
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if micro_batch_size < 1 or step < 0:
        raise DataError(f"micro_batch_size must be >= 1 and step >= 0, got {micro_batch_size} and {step}")
    n_rows, seq_len = rows.shape
    rows_per_step = world_size * micro_batch_size
    steps_per_epoch = n_rows // rows_per_step
    if steps_per_epoch == 0:
        raise DataError(
            f"the training set has {n_rows} rows ({n_rows * seq_len} tokens) but one step over "
            f"world_size={world_size} ranks with micro_batch_size={micro_batch_size} needs {rows_per_step} "
            f"rows ({rows_per_step * seq_len} tokens); add data, or lower seq_len or micro_batch_size"
        )
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    start = (step_in_epoch * world_size + rank) * micro_batch_size
    index = _epoch_permutation(n_rows, seed, epoch)[start:start + micro_batch_size]
    return rows[index].long()


@lru_cache(maxsize=4)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
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
