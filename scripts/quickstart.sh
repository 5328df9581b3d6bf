#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set-up, then the whole pipeline on the synthetic world —
# world, text tokenizer, tiny VQ-GAN, tiny SigLIP, pre-tokenization, stages 0/1/2 (2 CPU processes, FSDP2),
# ShapesBench on the final export.
#   bash scripts/quickstart.sh [key=value ...]      (overrides go to every step, e.g. train.max_steps=50)
# Artifacts go under $UMLLM_OUTPUT (default ~/.cache/unified_mllm); re-running reuses finished steps.
# UMLLM_SELF_CHECK: scenes the judge self-check reads (default 200); UMLLM_BENCH_LIMIT: test scenes and
# prompts ShapesBench evaluates (default 300); UMLLM_NPROC: training processes (default 2).
# UMLLM_RECIPE: quickstart (default: stages 0/1/2 of configs/train/tiny-stage*.yaml, the 20-minute budget) or long
# (configs/train/long-stage*.yaml: 2 400 / 150 / 600 steps, a VQA-only stage 3 of 1 800 and 200 steps of the
# stage-2 mix, about 61 min of training on 2 cores; it shares the world, tokenizers and pre-tokenized shards with
# the quickstart).
set -euo pipefail
case "${UMLLM_RECIPE:-quickstart}" in
    quickstart) stages=(tiny-stage0 tiny-stage1 tiny-stage2) ;;
    long) stages=(long-stage0 long-stage1 long-stage2 long-stage3 long-stage4) ;;
    *) echo "UMLLM_RECIPE must be 'quickstart' or 'long', not '$UMLLM_RECIPE'" >&2; exit 2 ;;
esac
steps=$((7 + ${#stages[@]}))
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
config=(--config configs/quickstart.yaml)
# shellcheck source=scripts/pipeline.sh
source "$repo_root/scripts/pipeline.sh"

step "1/$steps the synthetic world: train/val/test webdataset shards + statistics"
python -m unified_mllm.data.shapes "${config[@]}" --stats "$@"

step "2/$steps the text tokenizer: sentencepiece on the world's corpus"
python -m unified_mllm.text train "${config[@]}" "$@"

step "3/$steps the judge's self-check: read-back accuracy on clean and degraded renders"
python -m unified_mllm.eval.judge "${config[@]}" --self-check "${UMLLM_SELF_CHECK:-200}" "$@"

step "4/$steps the tiny VQ-GAN (64 px -> 8x8 codes) and its reconstructions"
launch -m unified_mllm.train.tokenizer --config configs/tokenizer/vqgan-tiny.yaml --no-progress "$@"
python -m unified_mllm.eval.tokenizer --config configs/tokenizer/vqgan-tiny.yaml \
    --limit "${UMLLM_BENCH_LIMIT:-300}" --no-progress "$@"

step "5/$steps the tiny SigLIP: sigmoid-loss pre-training on the captions"
python -m unified_mllm.train.contrastive --config configs/tokenizer/siglip-tiny.yaml "$@"

step "6/$steps pre-tokenization: VQ codes and text ids once per sample"
python -m unified_mllm.data.pretokenize "${config[@]}" "$@"

for stage in "${!stages[@]}"; do
    step "$((7 + stage))/$steps stage $stage ($nproc processes, FSDP2)"
    launch -m unified_mllm.train --config "configs/train/${stages[stage]}.yaml" "$@"
done

last=$((${#stages[@]} - 1))
step "$steps/$steps ShapesBench on the stage-$last export"
last_config="configs/train/${stages[last]}.yaml"
export_dir=$(python -m unified_mllm.config --config "$last_config" "$@" --get checkpoint.export_dir)
python -m unified_mllm.eval --task shapesbench --model "$export_dir" --limit "${UMLLM_BENCH_LIMIT:-300}" \
    --config "$last_config" "$@"

echo "== quickstart finished in $((SECONDS - pipeline_start)) s; artifacts under $(python -m unified_mllm.config "${config[@]}" "$@" | sed -n 's/^output_root: //p')"
