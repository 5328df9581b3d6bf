#!/usr/bin/env bash
# Launch one training stage under torchrun: the same command on one machine, many machines or SLURM.
#   bash scripts/train.sh configs/train/stage1.yaml [key=value ...]
# Environment (torchrun's standard arguments; defaults: one node, every local GPU, else 2 CPU processes):
#   NPROC_PER_NODE  processes on this node        NNODES     number of nodes (default 1)
#   NODE_RANK       this node's index             MASTER_ADDR / MASTER_PORT   rendezvous of node 0
# Under SLURM (one task per node), NNODES / NODE_RANK / MASTER_ADDR are taken from the job (see TRAIN.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/train.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
config=$1
shift
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
NPROC_PER_NODE=${NPROC_PER_NODE:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
if [[ $NNODES -eq 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}"
                --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
fi
exec torchrun "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" \
    -m unified_mllm.train --config "$config" "$@"
