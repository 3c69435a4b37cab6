#!/usr/bin/env bash
# Train on one machine with several GPUs: one process drives every local GPU
# (the mesh's data axis spans them), so no coordinator is needed.
#
#   launch/single_host.sh --config=configs/dfssd300_voc0712.py --workdir=runs/dfssd300 \
#       [--gpus=0,1,2,3] [--dry-run] [-- --config.batch_size=64 ...]
set -euo pipefail

CONFIG="" WORKDIR="" GPUS="" DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "single_host.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for v in CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then echo "single_host.sh: --${v,,} is required" >&2; exit 2; fi
done

cmd=(python -m smallssd_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
env_prefix=()
[[ -n "$GPUS" ]] && env_prefix=(env CUDA_VISIBLE_DEVICES="$GPUS")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${env_prefix[@]}" "${cmd[@]}"; echo
else
  "${env_prefix[@]}" "${cmd[@]}"
fi
