#!/usr/bin/env bash
# cfrl_jax on one machine with several GPUs: a single process drives all visible GPUs (no
# jax.distributed needed); the mesh spreads parameters and batch over them.
#
#   launch/single_node_gpus.sh                                   # all GPUs, configs/qwen_cfrl.py
#   GPUS=0,1,2,3 MESH_SHAPE='(1,-1,2)' launch/single_node_gpus.sh --config.rl.steps=50
set -euo pipefail

CONFIG="${CONFIG:-configs/qwen_cfrl.py}"
RUN_DIR="${RUN_DIR:-runs/qwen_cfrl}"
MESH_SHAPE="${MESH_SHAPE:-(1,-1,1)}"          # (data, fsdp, tensor); -1 = the remaining GPUs
GPUS="${GPUS:-}"                              # e.g. 0,1,2,3; empty: every GPU
PYTHON="${PYTHON:-python}"                    # with jax[cuda12] installed (see requirements.txt)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "$GPUS" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
export CFRL_DISTRIBUTED=off                   # one process, even inside a multi-task SLURM step
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

"$PYTHON" -c 'import jax; print("cfrl_jax: devices", jax.devices())'
exec "$PYTHON" -m cfrl_jax.main "--config=$CONFIG" "--config.run_dir=$RUN_DIR" \
  "--config.mesh.shape=$MESH_SHAPE" "$@"
