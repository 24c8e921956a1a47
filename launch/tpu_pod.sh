#!/usr/bin/env bash
# cfrl_jax on a Cloud TPU pod slice: one Python process per TPU VM worker, joined by
# jax.distributed (CFRL_DISTRIBUTED=auto lets JAX read the pod's topology from the TPU metadata).
#
#   launch/tpu_pod.sh create      # allocate the slice
#   launch/tpu_pod.sh install     # copy this checkout to every worker, build a Python 3.11 venv
#   launch/tpu_pod.sh run [--config.rl.steps=10 ...]   # train on all workers (extra args go to main)
#   launch/tpu_pod.sh ssh 'nvidia-smi || tpu-info'     # any command on all workers
#   launch/tpu_pod.sh delete      # tear down (billing stops)
#   launch/tpu_pod.sh all [...]   # create, install, run, delete
#
# Every variable below can be overridden from the environment, e.g.
#   TPU_NAME=me-v5e ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a BUCKET=gs://my-bucket/cfrl launch/tpu_pod.sh all
set -euo pipefail

TPU_NAME="${TPU_NAME:-cfrl-pod}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"            # v4-32 = 4 hosts x 4 chips
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"                                   # empty: gcloud's default project
SPOT="${SPOT:-0}"                                        # 1: spot capacity (preemptible)
BUCKET="${BUCKET:-gs://YOUR_BUCKET/cfrl}"                # run directories go under here
CONFIG="${CONFIG:-configs/qwen_cfrl.py}"
RUN_NAME="${RUN_NAME:-qwen_cfrl}"
MESH_SHAPE="${MESH_SHAPE:-(1,-1,1)}"                     # (data, fsdp, tensor); -1 = the remaining chips
REMOTE_DIR="${REMOTE_DIR:-cfrl_jax}"                     # checkout location in each worker's home
VENV="${VENV:-cfrl-venv}"                                # venv location in each worker's home
JAX_VERSION="${JAX_VERSION:-0.10.2}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_args=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then
  gcloud_args+=(--project "$PROJECT")
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command "$1"
}

create() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then
    extra+=(--spot)
  fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${extra[@]}"
}

install() {
  local archive
  archive="$(mktemp -t cfrl_src.XXXXXX).tar.gz"
  # Tracked and untracked-but-not-ignored files: the checkout as it is, without runs/ or caches.
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$archive" -T -)
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:cfrl_src.tar.gz" "${gcloud_args[@]}" --worker=all
  rm -f "$archive"
  # The TPU images ship Python 3.10; cfrl_jax needs 3.11, which uv installs without root.
  on_all_workers "set -e
    mkdir -p ~/$REMOTE_DIR && tar -xzf ~/cfrl_src.tar.gz -C ~/$REMOTE_DIR
    python3 -m pip install --user --quiet uv
    ~/.local/bin/uv venv --python 3.11 --allow-existing ~/$VENV
    cd ~/$REMOTE_DIR
    ~/.local/bin/uv pip install --python ~/$VENV/bin/python -r requirements.txt
    ~/.local/bin/uv pip install --python ~/$VENV/bin/python 'jax[tpu]==$JAX_VERSION' gcsfs
    ~/$VENV/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
}

run() {
  local quoted=""
  if (($#)); then
    quoted="$(printf ' %q' "$@")"
  fi
  # Same command on every worker; process 0 (worker 0) writes reports, all write checkpoint shards.
  on_all_workers "cd ~/$REMOTE_DIR && CFRL_DISTRIBUTED=auto ~/$VENV/bin/python -m cfrl_jax.main \
    --config=$CONFIG --config.run_dir=$BUCKET/$RUN_NAME '--config.mesh.shape=$MESH_SHAPE'$quoted"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_args[@]}" --quiet
}

usage() {
  sed -n '2,17p' "${BASH_SOURCE[0]}"
  exit 2
}

cmd="${1:-}"
if (($#)); then
  shift
fi
case "$cmd" in
  create) create ;;
  install) install ;;
  run) run "$@" ;;
  ssh) on_all_workers "${1:?ssh needs a command}" ;;
  delete) delete ;;
  all)
    create
    trap delete EXIT
    install
    run "$@"
    ;;
  *) usage ;;
esac
