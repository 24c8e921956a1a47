#!/usr/bin/env bash
# cfrl_jax on a SLURM GPU cluster: one process per node driving all its GPUs (default), or one
# process per GPU (sbatch --ntasks-per-node=8 ...). Processes join through jax.distributed; the
# coordinator is the job's first node. Run from the repository root on a shared filesystem:
#
#   sbatch launch/slurm_gpu.sh
#   sbatch --nodes=4 launch/slurm_gpu.sh --config.rl.steps=200     # extra args go to cfrl_jax.main
#   CONFIG=configs/qwen_grpo.py sbatch --ntasks-per-node=8 launch/slurm_gpu.sh
#
#SBATCH --job-name=cfrl_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

CONFIG="${CONFIG:-configs/qwen_cfrl.py}"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-cfrl}-${SLURM_JOB_ID:-local}}"   # on the shared filesystem
MESH_SHAPE="${MESH_SHAPE:-(1,-1,1)}"          # (data, fsdp, tensor); -1 = all remaining GPUs
PYTHON="${PYTHON:-python}"                    # e.g. $HOME/cfrl-venv/bin/python (jax[cuda12] installed)
PORT="${PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "Submit with sbatch (or run inside salloc); for one machine use launch/single_node_gpus.sh." >&2
  exit 2
fi

# What cfrl_jax.distributed.initialize_distributed reads (it would also derive them from SLURM_* alone).
coordinator_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export CFRL_COORDINATOR="$coordinator_host:$PORT"
export CFRL_NUM_PROCESSES="$SLURM_NTASKS"
tasks_per_node="${SLURM_NTASKS_PER_NODE:-1}"
export CFRL_TASKS_PER_NODE="$tasks_per_node"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

echo "cfrl_jax: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes, coordinator $CFRL_COORDINATOR"

# Per task: its rank, and its GPU when there is one process per GPU. Single quotes on purpose:
# SLURM_PROCID / SLURM_LOCALID differ per task and must expand inside srun's shell.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 --ntasks="$SLURM_NTASKS" bash -c '
  export CFRL_PROCESS_ID="$SLURM_PROCID"
  if [[ "$CFRL_TASKS_PER_NODE" -gt 1 ]]; then
    export CFRL_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
  fi
  exec "$0" -m cfrl_jax.main "$@"
' "$PYTHON" "--config=$CONFIG" "--config.run_dir=$RUN_DIR" "--config.mesh.shape=$MESH_SHAPE" "$@"
