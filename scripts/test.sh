#!/usr/bin/env bash
# The test command: set-up if needed, lint, then the whole suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k layout` or `-m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$repo_root"
ruff check .
python -m pytest "$@"
