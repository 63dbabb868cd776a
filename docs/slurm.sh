#!/bin/bash
# One prefopt-train run over 2 machines x 8 GPUs under SLURM: one srun task per machine, each an `accelerate launch`
# of 8 processes; the main machine is the first node of the allocation.
#   sbatch docs/slurm.sh loss=dpo model=qwen2.5-0.5b data=ultrafeedback trainer.mixed_precision=bf16
#SBATCH --job-name=prefopt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export PREFOPT_CACHE_DIR=${PREFOPT_CACHE_DIR:-$PWD/.prefopt-cache}  # shared file system: built once, under a lock
srun bash -c "accelerate launch \
  --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID --num_processes $((SLURM_NNODES * 8)) \
  --main_process_ip $MAIN --main_process_port 29500 --rdzv_backend static --mixed_precision bf16 \
  -m prefopt.train hydra.run.dir=outputs/slurm-$SLURM_JOB_ID $*"
