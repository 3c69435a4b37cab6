#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice: the same command on every host.
#
#   launch/tpu_vm.sh --tpu=my-v4-32 --zone=us-central2-b --project=my-proj \
#       --config=configs/dfssd300_voc0712.py --workdir=gs://bucket/runs/dfssd300 [--setup] [--dry-run] \
#       [-- --config.batch_size=256 ...]
#
# Every host runs `python -m smallssd_jax.main`; jax.distributed.initialize()
# finds the other hosts by itself on TPU VMs, each host reads its own shard of
# the data, and orbax writes the checkpoint collectively (use a gs:// workdir).
# --setup first clones/updates the repository and installs it on every host
# (set REPO_URL). tfds data must be reachable from every host: set
# TFDS_DATA_DIR to a bucket, or config.data.root to a mounted folder.
set -euo pipefail

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" SETUP=0 DRY_RUN=0
REPO_URL="${REPO_URL:-}"
REPO_DIR="${REPO_DIR:-smallssd_jax}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --setup) SETUP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for v in TPU ZONE CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then echo "tpu_vm.sh: --${v,,} is required" >&2; exit 2; fi
done

if [[ $SETUP == 1 && -z "$REPO_URL" ]]; then
  echo "tpu_vm.sh: --setup needs REPO_URL (the git URL every host clones)" >&2; exit 2
fi

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && gcloud_ssh+=(--project="$PROJECT")

setup_cmd="set -e; if [ -d $REPO_DIR ]; then git -C $REPO_DIR pull --ff-only; else git clone $REPO_URL $REPO_DIR; fi; \
cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
# The remote shell runs this string: quote each argument for it.
main_cmd=$(printf '%q ' python -m smallssd_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
train_cmd="cd $REPO_DIR && . .venv/bin/activate && ${TFDS_DATA_DIR:+TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR") }$main_cmd"

run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [[ $SETUP == 1 ]]; then run "${gcloud_ssh[@]}" --command="$setup_cmd"; fi
run "${gcloud_ssh[@]}" --command="$train_cmd"
