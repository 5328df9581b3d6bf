#!/usr/bin/env bash
# Set-up on a fresh machine; safe to re-run (it skips what is done) and to `source` from other scripts.
#  1. use the active virtualenv, else create/activate ./.venv;
#  2. install the pinned CPU build of torch only when no torch is importable (GPU users install their
#     own CUDA build first, see INSTALL.md; an unpinned `torch` would pull gigabytes of CUDA wheels);
#  3. pip install -e ".[dev,bench,serve,adapt]" (again only when pyproject.toml changed).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$repo_root/.venv/bin/python" ]; then
    echo "[setup] creating $repo_root/.venv"
    python3 -m venv "$repo_root/.venv"
  fi
  # shellcheck disable=SC1091
  source "$repo_root/.venv/bin/activate"
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
stamp="$VIRTUAL_ENV/.unified_mllm-$(sha1sum "$repo_root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ] || ! python -c "import unified_mllm" >/dev/null 2>&1; then
  echo "[setup] pip install -e .[dev,bench,serve,adapt]"
  python -m pip install --quiet --disable-pip-version-check -e "$repo_root[dev,bench,serve,adapt]"
  touch "$stamp"
fi
