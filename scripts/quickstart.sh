#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set-up, then the whole pipeline on the synthetic world —
# world, text tokenizer, tiny VQ-GAN, tiny SigLIP, pre-tokenization, stages 0/1/2 (2 CPU processes, FSDP2),
# ShapesBench on the final export.
#   bash scripts/quickstart.sh [key=value ...]      (overrides go to every step, e.g. train.max_steps=50)
# Artifacts go under $UMLLM_OUTPUT (default ~/.cache/unified_mllm); re-running reuses finished steps.
# UMLLM_SELF_CHECK: scenes the judge self-check reads (default 200); UMLLM_BENCH_LIMIT: test scenes and
# prompts ShapesBench evaluates (default 300); UMLLM_NPROC: training processes (default 2).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
config=(--config configs/quickstart.yaml)
# shellcheck source=scripts/pipeline.sh
source "$repo_root/scripts/pipeline.sh"

step "1/10 the synthetic world: train/val/test webdataset shards + statistics"
python -m unified_mllm.data.shapes "${config[@]}" --stats "$@"

step "2/10 the text tokenizer: sentencepiece on the world's corpus"
python -m unified_mllm.text train "${config[@]}" "$@"

step "3/10 the judge's self-check: read-back accuracy on clean and degraded renders"
python -m unified_mllm.eval.judge "${config[@]}" --self-check "${UMLLM_SELF_CHECK:-200}" "$@"

step "4/10 the tiny VQ-GAN (64 px -> 8x8 codes) and its reconstructions"
launch -m unified_mllm.train.tokenizer --config configs/tokenizer/vqgan-tiny.yaml --no-progress "$@"
python -m unified_mllm.eval.tokenizer --config configs/tokenizer/vqgan-tiny.yaml \
    --limit "${UMLLM_BENCH_LIMIT:-300}" --no-progress "$@"

step "5/10 the tiny SigLIP: sigmoid-loss pre-training on the captions"
python -m unified_mllm.train.contrastive --config configs/tokenizer/siglip-tiny.yaml "$@"

step "6/10 pre-tokenization: VQ codes and text ids once per sample"
python -m unified_mllm.data.pretokenize "${config[@]}" "$@"

for stage in 0 1 2; do
    step "$((7 + stage))/10 stage $stage ($nproc processes, FSDP2)"
    launch -m unified_mllm.train --config "configs/train/tiny-stage$stage.yaml" "$@"
done

step "10/10 ShapesBench on the stage-2 export"
export_dir=$(python -m unified_mllm.config --config configs/train/tiny-stage2.yaml "$@" |
    sed -n 's/^  export_dir: //p')
python -m unified_mllm.eval --task shapesbench --model "$export_dir" --limit "${UMLLM_BENCH_LIMIT:-300}" \
    --config configs/train/tiny-stage2.yaml "$@"

echo "== quickstart finished in $((SECONDS - pipeline_start)) s; artifacts under $(python -m unified_mllm.config "${config[@]}" "$@" | sed -n 's/^output_root: //p')"
