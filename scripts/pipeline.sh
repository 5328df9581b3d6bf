# Helpers the pipeline scripts (quickstart.sh, compare_tokenizers.sh) source after setup.sh; not run alone.
# step MESSAGE: a progress line with the seconds since the script started.
# launch ARGS...: torchrun with UMLLM_NPROC (default 2) processes on this node.
nproc=${UMLLM_NPROC:-2}
pipeline_start=$SECONDS
step() { echo "== $1 ($((SECONDS - pipeline_start)) s)"; }
# The steps run one after another: single-process steps use every core, and torchrun gives each of its ranks
# one intra-op thread (OMP_NUM_THREADS=1), which is what 2 ranks on 2 cores want.
# Each rank ends through train.distributed.exit_finished_worker, which keeps PyTorch's teardown race (a rank
# aborting after its work was saved) from failing a finished step.
launch() { torchrun --standalone --nproc_per_node="$nproc" "$@"; }
