#!/usr/bin/env bash
# VQ-GAN vs UniTok vs DualToken on the embedded world, the unified model trained with the same budget on each:
# per tokenizer, its tiny recipe (configs/tokenizer/<kind>-tiny.yaml) and reconstruction + semantic zero-shot
# evaluation, pre-tokenization, stages 0/1/2 (the quickstart's budgets, 2 CPU processes) and ShapesBench; then
# one table (unified_mllm.eval.compare) in ${output_root}/compare/tokenizers.md.
#   bash scripts/compare_tokenizers.sh [key=value ...]     (overrides go to every step)
# The VQ-GAN row is the quickstart's own pipeline (finished quickstart steps are reused); every step is reused
# when it finished before. UMLLM_BENCH_LIMIT: test scenes/prompts evaluated (default 300); UMLLM_NPROC: ranks.
# About an hour on a quiet 2-core box when nothing is reused (the VQ-GAN row alone is the quickstart).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$repo_root/scripts/setup.sh"
cd "$repo_root"
limit=${UMLLM_BENCH_LIMIT:-300}
# shellcheck source=scripts/pipeline.sh
source "$repo_root/scripts/pipeline.sh"
# config_value KEY [--config FILE ...] [key=value ...]: one resolved setting.
config_value() { python -m unified_mllm.config --get "$@"; }

step "shared: the world, the text tokenizer, the tiny SigLIP (DualToken's backbone and teacher)"
python -m unified_mllm.data.shapes --config configs/quickstart.yaml --stats "$@"
python -m unified_mllm.text train --config configs/quickstart.yaml "$@"
python -m unified_mllm.train.contrastive --config configs/tokenizer/siglip-tiny.yaml "$@"

rows=()
for kind in vqgan unitok dualtoken; do
    # The unified model's files for this tokenizer: none for the VQ-GAN (the quickstart's defaults).
    model=()
    runs=quickstart
    data=()
    if [ "$kind" != vqgan ]; then
        model=(--config "configs/model/$kind-tiny.yaml")
        runs="compare-$kind"
        data=("data.tokenized_root=\${data.root}/tokenized-$kind")
    fi
    step "$kind: tokenizer training and evaluation"
    launch -m unified_mllm.train.tokenizer --config "configs/tokenizer/$kind-tiny.yaml" --no-progress "$@"
    python -m unified_mllm.eval.tokenizer --config "configs/tokenizer/$kind-tiny.yaml" \
        --limit "$limit" --no-progress "$@"
    step "$kind: pre-tokenization"
    python -m unified_mllm.data.pretokenize --config configs/quickstart.yaml "${model[@]}" "${data[@]}" "$@"
    previous=()
    for stage in 0 1 2; do
        step "$kind: stage $stage ($nproc processes, FSDP2)"
        launch -m unified_mllm.train --config "configs/train/tiny-stage$stage.yaml" "${model[@]}" \
            "run_name=$runs-stage$stage" "${data[@]}" "${previous[@]}" --no-progress "$@"
        previous=("checkpoint.init_from=\${output_root}/runs/$runs-stage$stage/export")
    done
    export_dir=$(config_value checkpoint.export_dir --config configs/train/tiny-stage2.yaml "${model[@]}" \
        "run_name=$runs-stage2" "$@")
    step "$kind: ShapesBench"
    python -m unified_mllm.eval --task shapesbench --model "$export_dir" --limit "$limit" \
        --config configs/train/tiny-stage2.yaml "${model[@]}" "$@"
    tokenizer_dir=$(config_value vq_train.output_dir --config "configs/tokenizer/$kind-tiny.yaml" "$@")
    rows+=(--row "$kind" "$tokenizer_dir" "$export_dir")
done

output_root=$(config_value output_root --config configs/quickstart.yaml "$@")
python -m unified_mllm.eval.compare "${rows[@]}" --output "$output_root/compare"
echo "== finished in $((SECONDS - pipeline_start)) s; table in $output_root/compare/tokenizers.md"
