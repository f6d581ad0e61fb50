#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per node, every node runs the same command, JAX finds
# the other nodes from SLURM's variables (jax.distributed.initialize()).
#
#   launch/slurm_gpu.sh [--dry-run] CONFIG WORKDIR [-- EXTRA FLAGS...]
#
#   CONFIG   e.g. configs/vicuna13b/video.py:h100x8
#   WORKDIR  a directory every node can write (shared file system or gs://)
#
# Environment: NODES (1), GPUS_PER_NODE (8), PARTITION (gpu), TIME (48:00:00), ACCOUNT,
# VENV (.venv of this checkout, created by `make setup` plus the CUDA jax build: BUILD.md).
# --dry-run prints the sbatch command and the batch script instead of submitting.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
EXTRA="$(printf '%q ' "$@")"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PARTITION="${PARTITION:-gpu}"
TIME="${TIME:-48:00:00}"
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$REPO_DIR/.venv}"
ACCOUNT_LINE=""
[[ -n "${ACCOUNT:-}" ]] && ACCOUNT_LINE="#SBATCH --account=${ACCOUNT}"

SCRIPT="$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=xblip
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS_PER_NODE}
#SBATCH --cpus-per-task=16
#SBATCH --partition=${PARTITION}
#SBATCH --time=${TIME}
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=${WORKDIR}/slurm-%j.log
${ACCOUNT_LINE}
set -euo pipefail
cd ${REPO_DIR}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# SIGTERM 300 s before the time limit: the trainer saves a checkpoint and stops; --requeue
# restarts the job, which resumes from the workdir's latest step.
srun --kill-on-bad-exit=1 ${VENV}/bin/python -m xblip_jax.main --config ${CONFIG} \\
  --workdir ${WORKDIR} --config.distributed=True ${EXTRA}
EOF
)"

if [[ $DRY_RUN -eq 1 ]]; then
  echo "mkdir -p ${WORKDIR}"
  echo "sbatch <<'SBATCH'"
  echo "$SCRIPT"
  echo "SBATCH"
  exit 0
fi
mkdir -p "$WORKDIR"
sbatch <<<"$SCRIPT"
