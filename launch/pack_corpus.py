#!/usr/bin/env python
"""Pack folders of documentation into one JSON-lines corpus for a machine without network.

    python launch/pack_corpus.py --out ~/kvforge-data/debian-docs.jsonl.xz DIR_OR_FILE [...]

Every file under the given folders whose name ends in one of --extensions (optionally followed by .gz or .dz,
as Debian ships most documentation and dictd its dictionaries) becomes one document {"text": ..., "source": <path
relative to its root>} of the output, in sorted order (a file over --split-chars becomes several, cut at blank
lines): the training data layer reads such a file as one source (trainer/data.py; its document split, packing and
cache apply as to any jsonl). Files shorter than --min-chars, not UTF-8, or with the same text as an earlier one
are left out and counted.

--exclude-overlap FOLDER...: decontamination against held-out text. Every paragraph (blank-line separated) that
shares a run of --overlap-words words (lowercased, punctuation dropped; 13 as in GPT-3's contamination check) with
any file under those folders is left out and counted, so a corpus of dictionaries and books, which quote what
Debian's fortunes quote, keeps no passage of the held-out prose. An output ending in .xz is compressed (text compresses
~4-5x), ready to carry to a GPU machine in calls of 64 MiB (docs/TRAINING.md, "Bringing real text to a machine
without network"); there `xz -d` gives the jsonl back.

Example, the English documentation of four Debian packages (~100 MB of reST, POD and AsciiDoc; none of it is
the held-out prose, Debian's fortunes):
    apt-get download python3.11-doc linux-doc-6.1 perl-doc git-doc
    for d in *.deb; do dpkg-deb -x "$d" x; done
    python launch/pack_corpus.py --out debian-docs.jsonl.xz x/usr/share/doc/python3.11/html/_sources \\
        x/usr/share/doc/linux-doc-6.1/Documentation x/usr/share/perl/5.36.0/pod x/usr/share/doc/git-doc

Prose (~11M tokens, 9.5 MiB as .xz -9e: Webster's 1913 dictionary with its literary citations, Bierce's Devil's Dictionary, the Jargon
File, the Debian Reference), decontaminated against the held-out fortunes:
    apt-get download dict-gcide dict-devil dict-jargon debian-reference-en
    for d in *.deb; do dpkg-deb -x "$d" x; done
    python launch/pack_corpus.py --out debian-prose.jsonl.xz --extensions .dict .en.txt --fallback-encoding cp1252 \
        --exclude-overlap /usr/share/games/fortunes -- x/usr/share/dictd x/usr/share/debian-reference
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

DEFAULT_EXTENSIONS = (".rst", ".txt", ".md", ".pod")  # ".txt" also takes Sphinx's "_sources/*.rst.txt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="folders (searched recursively) or files")
    parser.add_argument("--out", type=Path, required=True, help="the corpus: .jsonl, or .jsonl.xz to compress it")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS),
                        help="file name endings kept, each also with .gz after it (default: %(default)s)")
    parser.add_argument("--min-chars", type=int, default=200, help="shorter documents are left out")
    parser.add_argument("--split-chars", type=int, default=50_000,
                        help="longer files become several documents, cut at blank lines (default: %(default)s)")
    parser.add_argument("--exclude-overlap", nargs="+", type=Path, default=[],
                        help="folders or files of held-out text: paragraphs sharing a word run with them are left out")
    parser.add_argument("--overlap-words", type=int, default=13, help="the word run length (default: %(default)s)")
    parser.add_argument("--fallback-encoding", help="decode files that are not UTF-8 with this (e.g. cp1252: GCIDE "
                        "has a few such bytes); default: leave them out")
    args = parser.parse_args(argv)
    for name in ("min_chars", "split_chars", "overlap_words"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


COMPRESSED = (".gz", ".dz")  # dictd's .dz is gzip with an index in its header


def matches(path: Path, extensions: tuple[str, ...]) -> bool:
    name = path.name
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return any(name.endswith(ext) for ext in extensions)


def read_text(path: Path, fallback_encoding: str | None = None) -> str | None:
    """The file's text (decompressed when it ends in .gz or .dz), or None when it is not UTF-8 (nor decodes with
    `fallback_encoding`, when given)."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(COMPRESSED) else path.read_bytes()
    for encoding in ("utf-8", fallback_encoding):
        try:
            return data.decode(encoding) if encoding else None
        except UnicodeDecodeError:
            continue
    return None


_WORD = re.compile(r"[a-z0-9']+")
_PARAGRAPH = re.compile(r"\n\s*\n")


def word_runs(text: str, n: int) -> set[int]:
    """Hashes of every run of n consecutive words of `text` (lowercased, punctuation and layout dropped)."""
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def files_under(root: Path, what: str) -> list[Path]:
    """`root` itself when it is a file, else every file under it in sorted order; `what`: the missing path's error."""
    if not root.exists():
        raise SystemExit(f"pack_corpus: {what} {root} does not exist")
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def held_out_runs(paths: list[Path], n: int) -> set[int]:
    runs: set[int] = set()
    for root in paths:
        for path in files_under(root.expanduser(), "--exclude-overlap (held-out text)"):
            runs |= word_runs(path.read_bytes().decode("utf-8", errors="replace"), n)
    return runs


def split_paragraphs(text: str, limit: int) -> list[str]:
    """`text` cut at blank lines into parts of at most ~`limit` characters (a longer paragraph stays whole)."""
    parts, current, size = [], [], 0
    for paragraph in _PARAGRAPH.split(text):
        if current and size + len(paragraph) > limit:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    parts.append("\n\n".join(current))
    return parts


def without_overlap(text: str, runs: set[int], n: int, counts: dict) -> str:
    kept = []
    for paragraph in _PARAGRAPH.split(text):
        if word_runs(paragraph, n) & runs:
            counts["overlapping_paragraphs"] += 1
        else:
            kept.append(paragraph)
    return "\n\n".join(kept)


def documents(inputs: list[Path], extensions: tuple[str, ...], min_chars: int, counts: dict,
              split_chars: int = 50_000, held_out: set[int] = frozenset(), overlap_words: int = 13,
              fallback_encoding: str | None = None):
    """Yields (source, text) for every kept file (or part of one, over `split_chars`), in sorted order per input,
    without paragraphs that share a word run with `held_out`; `counts` tallies what was left out."""
    seen = set()
    for root in inputs:
        root = root.expanduser()
        for path in files_under(root, "input (a folder or a file of documentation)"):
            if not matches(path, extensions):
                continue
            text = read_text(path, fallback_encoding)
            if text is None:
                counts["not_utf8"] += 1
                continue
            if held_out:
                text = without_overlap(text, held_out, overlap_words, counts)
            source = path.name if root.is_file() else str(path.relative_to(root))
            parts = split_paragraphs(text, split_chars) if len(text) > split_chars else [text]
            for i, part in enumerate(parts):
                part = part.strip()
                if len(part) < min_chars:
                    counts["too_short"] += 1
                    continue
                digest = hashlib.sha256(part.encode()).digest()
                if digest in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(digest)
                yield f"{root.name}/{source}" + (f"#{i}" if len(parts) > 1 else ""), part


def main(argv=None) -> int:
    args = parse_args(argv)
    extensions = tuple(args.extensions)
    out = args.out.expanduser()
    if not out.name.endswith((".jsonl", ".jsonl.xz")):
        raise SystemExit(f"pack_corpus: --out {out} must end in .jsonl or .jsonl.xz")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"documents": 0, "chars": 0, "not_utf8": 0, "too_short": 0, "duplicates": 0, "overlapping_paragraphs": 0}
    held_out = held_out_runs(args.exclude_overlap, args.overlap_words) if args.exclude_overlap else frozenset()
    partial = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted run leaves no corpus
    # xz at preset 9e: ~2% smaller than the default 6, which counts when a call carries at most 64 MiB.
    opener = functools.partial(lzma.open, preset=9 | lzma.PRESET_EXTREME) if out.name.endswith(".xz") else open
    with opener(partial, "wt", encoding="utf-8") as sink:
        for source, text in documents(args.inputs, extensions, args.min_chars, counts, args.split_chars, held_out,
                                      args.overlap_words, args.fallback_encoding):
            sink.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            counts["documents"] += 1
            counts["chars"] += len(text)
    if counts["documents"] == 0:
        partial.unlink()
        raise SystemExit(f"pack_corpus: no file under {', '.join(map(str, args.inputs))} ends in "
                         f"{', '.join(extensions)} (or .gz of one) with {args.min_chars}+ characters of UTF-8")
    partial.replace(out)
    # ~4 characters per token for English prose with a BPE vocabulary like SmolLM2's
    print(f"{out}: {counts['documents']:,} documents, {counts['chars']:,} characters (~{counts['chars'] // 4:,} "
          f"tokens), {out.stat().st_size / 2**20:.1f} MiB; left out: {counts['not_utf8']} not UTF-8, "
          f"{counts['too_short']} under {args.min_chars} characters, {counts['duplicates']} duplicates, "
          f"{counts['overlapping_paragraphs']} paragraphs sharing {args.overlap_words} words with the held-out text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
