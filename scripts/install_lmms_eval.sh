#!/usr/bin/env bash
# Install lmms-eval 0.7.3 into the active Python environment for unified_mllm's adapter
# (unified_mllm/eval/adapters/lmms_eval.py: python -m lmms_eval --model unified_mllm ...), keeping its torch.
#   bash scripts/install_lmms_eval.sh          (PYTHON=/path/to/python to choose the interpreter)
# Why not `pip install lmms-eval`: its requirements name torch, torchvision, timm, peft, wandb==0.25.0,
# sentence-transformers, opencv, av, yt-dlp, ... so pip replaces a CPU torch with a CUDA build and pulls gigabytes.
# lmms-eval itself goes in without dependencies; then only what its evaluator and command line import for a
# task over local files (found one import error at a time), pinned, under a constraints file that holds torch,
# numpy and transformers at their installed versions. filelock stays below 4: lmms-eval 0.7.3's evaluator
# imports filelock._api, which filelock 4 no longer has. Tasks of lmms-eval's own catalogue may import more
# (an LLM judge's openai client, ...): install those the same way when a task names them.
# Idempotent: a second run installs nothing. Fails, naming it, if torch would change.
set -euo pipefail
python=${PYTHON:-python}
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "install_lmms_eval.sh: torch is not importable by $python; install unified_mllm first" >&2
    exit 1
fi
installed() { "$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
torch_before=$(installed torch)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
for package in torch numpy transformers; do
    echo "$package==$(installed "$package")" >>"$constraints"
done

"$python" -m pip install --no-deps "lmms-eval==0.7.3"
"$python" -m pip install -c "$constraints" \
    "loguru==0.7.3" \
    "sacrebleu==2.6.0" \
    "evaluate==0.4.6" \
    "datasets==5.2.0" \
    "pytz>=2024.1" \
    "tenacity==9.2.1" \
    "filelock>=3.16,<4" \
    "pytablewriter==1.2.1"

torch_after=$(installed torch)
if [ "$torch_before" != "$torch_after" ]; then
    echo "install_lmms_eval.sh: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi
"$python" -c "import lmms_eval.evaluator, lmms_eval.tasks; import unified_mllm.eval.adapters.lmms_eval" \
    || { echo "install_lmms_eval.sh: lmms-eval does not import" >&2; exit 1; }
echo "lmms-eval 0.7.3 installed; torch $torch_after kept"
