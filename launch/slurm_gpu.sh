#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU across N nodes.
#
#   launch/slurm_gpu.sh --nodes=2 --gpus-per-node=8 --config=configs/skipfpn320_coco.py \
#       --workdir=/shared/runs/skipfpn320_coco [--partition=gpu] [--time=72:00:00] [--dry-run] \
#       [-- --config.batch_size=64 ...]
#
# Writes an sbatch script and submits it (--dry-run prints it instead).
# srun starts one task per GPU; jax.distributed.initialize() reads the SLURM
# environment (coordinator, process count and id) by itself, and each task
# sees one GPU. The workdir must be on a filesystem every node sees.
set -euo pipefail

NODES=1 GPUS=8 CONFIG="" WORKDIR="" PARTITION="" TIME="72:00:00" DRY_RUN=0
VENV="${VENV:-$(pwd)/.venv}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for v in CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then echo "slurm_gpu.sh: --${v,,} is required" >&2; exit 2; fi
done

# The job's shell commands, each argument quoted for the shell that runs the script.
train_cmd=$(printf '%q ' python -m smallssd_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})

script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=smallssd
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=8
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
set -euo pipefail
mkdir -p $(printf '%q' "$WORKDIR")
source $(printf '%q' "$VENV")/bin/activate
# One GPU per task; JAX discovers the job through the SLURM variables.
srun --gpus-per-task=1 --kill-on-bad-exit=1 \\
  $train_cmd
SBATCH
)

if [[ $DRY_RUN == 1 ]]; then
  echo "$script"
  echo "# submit with: sbatch <the script above>"
else
  # SLURM opens --output before the job runs: its folder must exist at submission.
  mkdir -p "$WORKDIR"
  tmp=$(mktemp --suffix=.sbatch)
  echo "$script" > "$tmp"
  sbatch "$tmp"
fi
