#!/usr/bin/env bash
# SLURM launcher for the trainers: one task per node, every GPU of the node.
#   sbatch --nodes 2 scripts/slurm_train.sh train_repae.py --config configs/... --exp-name NAME
# SIGTERM (scancel, time limit) reaches the trainer, which saves at the end of the step; the job is
# requeue-safe because it always continues from the experiment's latest checkpoint.
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
SCRIPT=${1:?usage: sbatch scripts/slurm_train.sh TRAINER.py [flags...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS=${SLURM_GPUS_ON_NODE:-8}
NODES=${SLURM_NNODES:-1}
ARGS=$(printf ' %q' "$@")
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# srun forwards the scheduler's SIGTERM to every task; `exec` lets accelerate receive it directly.
srun --kill-on-bad-exit=1 bash -c "exec .venv/bin/accelerate launch --multi_gpu \
  --num_machines $NODES --num_processes $((NODES * GPUS)) --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR --main_process_port ${MASTER_PORT:-29500} \
  $SCRIPT$ARGS --resume latest"
