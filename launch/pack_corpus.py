#!/usr/bin/env python
"""Pack folders of documentation into one JSON-lines corpus for a machine without network.

    python launch/pack_corpus.py --out ~/kvforge-data/debian-docs.jsonl.xz DIR_OR_FILE [...]

Every file under the given folders whose name ends in one of --extensions (optionally followed by .gz, as
Debian ships most documentation) becomes one document {"text": ..., "source": <path relative to its root>} of
the output, in sorted order: the training data layer reads such a file as one source (trainer/data.py; its
document split, packing and cache apply as to any jsonl). Files shorter than --min-chars, not UTF-8, or with the
same text as an earlier one are left out and counted. An output ending in .xz is compressed (text compresses
~4-5x), ready to carry to a GPU machine in calls of 64 MiB (docs/TRAINING.md, "Bringing real text to a machine
without network"); there `xz -d` gives the jsonl back.

Example, the English documentation of four Debian packages (~100 MB of reST, POD and AsciiDoc; none of it is
the held-out prose, Debian's fortunes):
    apt-get download python3.11-doc linux-doc-6.1 perl-doc git-doc
    for d in *.deb; do dpkg-deb -x "$d" x; done
    python launch/pack_corpus.py --out debian-docs.jsonl.xz x/usr/share/doc/python3.11/html/_sources \\
        x/usr/share/doc/linux-doc-6.1/Documentation x/usr/share/perl/5.36.0/pod x/usr/share/doc/git-doc
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
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
    return parser.parse_args(argv)


def matches(path: Path, extensions: tuple[str, ...]) -> bool:
    name = path.name.removesuffix(".gz")
    return any(name.endswith(ext) for ext in extensions)


def read_text(path: Path) -> str | None:
    """The file's text (decompressed when it ends in .gz), or None when it is not UTF-8."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def documents(inputs: list[Path], extensions: tuple[str, ...], min_chars: int, counts: dict):
    """Yields (source, text) for every kept file, in sorted order per input; `counts` tallies what was left out."""
    seen = set()
    for root in inputs:
        root = root.expanduser()
        if not root.exists():
            raise SystemExit(f"pack_corpus: {root} does not exist (expected a folder or a file of documentation)")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if not matches(path, extensions):
                continue
            text = read_text(path)
            if text is None:
                counts["not_utf8"] += 1
                continue
            text = text.strip()
            if len(text) < min_chars:
                counts["too_short"] += 1
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            source = path.name if root.is_file() else str(path.relative_to(root))
            yield f"{root.name}/{source}", text


def main(argv=None) -> int:
    args = parse_args(argv)
    extensions = tuple(args.extensions)
    out = args.out.expanduser()
    if not out.name.endswith((".jsonl", ".jsonl.xz")):
        raise SystemExit(f"pack_corpus: --out {out} must end in .jsonl or .jsonl.xz")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"documents": 0, "chars": 0, "not_utf8": 0, "too_short": 0, "duplicates": 0}
    partial = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted run leaves no corpus
    opener = lzma.open if out.name.endswith(".xz") else open
    with opener(partial, "wt", encoding="utf-8") as sink:
        for source, text in documents(args.inputs, extensions, args.min_chars, counts):
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
          f"{counts['too_short']} under {args.min_chars} characters, {counts['duplicates']} duplicates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
