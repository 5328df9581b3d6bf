#!/usr/bin/env bash
# The test command: set-up if needed (+ lmms-eval for its adapter's tests), lint, then the whole suite
# (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k layout` or `-m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$repo_root"
# The lmms-eval adapter's tests run lmms-eval's own evaluator: install it the way that keeps our torch.
python -c "import lmms_eval" >/dev/null 2>&1 || bash scripts/install_lmms_eval.sh >/dev/null
ruff check .
python -m pytest "$@"
