#!/usr/bin/env bash
# The oldest and newest supported Pythons: for each, a venv with the package and its test
# extra runs a fast selection of the suite (the pure unit tests and the local backend's
# half of the executor tests). The whole suite, with the real Slurm cluster, runs on the
# main python3.
#   bash scripts/other_pythons.sh              # 3.10 and 3.13
#   bash scripts/other_pythons.sh 3.12 ...     # other versions
# Interpreters: pyenv's newest X.Y.* under ${PYENV_ROOT:-~/.pyenv}, else pythonX.Y on PATH.
# A missing one is skipped with a warning, but fails the run under CI=true. The venvs are
# kept in ${SLURMEXECUTOR_VENVS:-~/.cache/slurmexecutor/venvs} and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || set -- 3.10 3.13
venvs="${SLURMEXECUTOR_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/slurmexecutor/venvs}"
# ~1.5 min per version: the Slurm-backed tests are deselected (SLURMEXECUTOR_SKIP_SLURM).
# The result cache's fingerprints depend on the bytecode, so they are tested on each.
selection=(tests/test_state.py tests/test_units.py tests/test_claims.py
           tests/test_contract.py tests/test_workflows.py tests/test_cache.py
           tests/test_result_cache.py tests/test_mapreduce.py tests/test_environment.py
           tests/test_worker_exit.py tests/test_lease.py tests/test_paths.py
           tests/test_core_defects.py tests/test_futures_end.py)

find_python() {  # find_python X.Y: print the interpreter's path, or nothing
  local found
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$1".*/bin/python"$1" 2>/dev/null |
          sort -V | tail -n 1 || true)
  [ -n "$found" ] || found=$(command -v "python$1" || true)
  echo "$found"
}

failed=()
for version in "$@"; do
  python=$(find_python "$version")
  if [ -z "$python" ]; then
    echo "other_pythons: Python $version not found (pyenv install $version)" >&2
    if [ "${CI:-}" = true ]; then failed+=("$version (missing)"); fi
    continue
  fi
  venv="$venvs/py$version"
  echo "=== Python $version: $python (venv $venv)"
  if ! "$venv/bin/python" -c "import sys; assert sys.version.startswith('$version.')" \
      2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q -e ".[test]"
  if ! SLURMEXECUTOR_SKIP_SLURM=1 "$venv/bin/python" -m pytest -q -rfE -p no:cacheprovider \
      "${selection[@]}"; then
    failed+=("$version")
  fi
  # CPython's own test_concurrent_futures, where this Python ships it (3.13 and 3.10
  # here; pyenv's 3.11 omits it), on the local backend and a real Slurm cluster of its own
  if "$venv/bin/python" -c "import test.test_concurrent_futures" 2>/dev/null; then
    if ! "$venv/bin/python" -m pytest -q -rfEs -p no:cacheprovider \
        tests/test_cpython_futures.py; then
      failed+=("$version (CPython's test_concurrent_futures)")
    fi
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "other_pythons: FAILED on Python ${failed[*]}" >&2
  exit 1
fi
