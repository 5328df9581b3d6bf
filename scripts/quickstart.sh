#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set-up, then every pipeline step that exists so far.
#   bash scripts/quickstart.sh [key=value ...]      (overrides go to every step, e.g. data.world.num_train=2000)
# Artifacts go under $UMLLM_OUTPUT (default ~/.cache/unified_mllm); re-running reuses finished steps.
# UMLLM_SELF_CHECK sets how many scenes the judge self-check reads (default 1000).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
config=(--config configs/quickstart.yaml)
start=$SECONDS

echo "== 1/3 the synthetic world: train/val/test webdataset shards + statistics"
python -m unified_mllm.data.shapes "${config[@]}" --stats "$@"

echo "== 2/3 the text tokenizer: sentencepiece on the world's corpus"
python -m unified_mllm.text train "${config[@]}" "$@"

echo "== 3/3 the judge's self-check: read-back accuracy on clean and degraded renders"
python -m unified_mllm.eval.judge "${config[@]}" --self-check "${UMLLM_SELF_CHECK:-1000}" "$@"

echo "== quickstart finished in $((SECONDS - start)) s; artifacts under $(python -m unified_mllm.config "${config[@]}" "$@" | sed -n 's/^output_root: //p')"
