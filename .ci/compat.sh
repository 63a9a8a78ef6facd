#!/usr/bin/env bash
# The export round trip under other transformers releases, each in a venv of its own where kvforge is not
# installed (as a user serving an exported directory has it):
#   bash .ci/compat.sh EXPORTS_DIR VERSION [VERSION ...]     VERSION: a release (e.g. 5.0.0) or "newest"
# "newest" is whatever the registry serves today, above pyproject's tested bound too: upstream drift shows up
# here as a failing line naming the release, not as garbage tokens in users' hands.
# EXPORTS_DIR: tiny exports written by tests/compat/write_exports.py (make compat does both).
set -euo pipefail
exports=$(realpath "$1"); shift
root=$(pwd)
torch=$(sed -n 's/^torch==//p' requirements.lock)
for version in "$@"; do
    venv="$root/.venv-compat/$version"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch"
    if [ "$version" = newest ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade transformers
    else
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version"
    fi
    resolved=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
    echo "compat: checking transformers $resolved ($version) with torch $torch"
    # -I: neither the repo nor PYTHONPATH on the path; run from the exports folder, away from the repo.
    (cd "$exports" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$venv/bin/python" -I "$root/launch/check_export.py" \
        "$exports"/*/ --json "$exports/compat-$resolved.json")
done
