#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM, copy this checkout to every worker,
# install, run the same command on all workers, tail the logs, delete the slice.
#
#   launch/tpu_pod.sh [--dry-run] [--keep] CONFIG WORKDIR [-- EXTRA FLAGS...]
#
#   CONFIG   e.g. configs/vicuna7b/image.py:v5e-64
#   WORKDIR  a gs:// bucket path (Orbax writes checkpoints there from every host)
#
# Environment: TPU_NAME (default xblip-$USER), ZONE (us-west4-a), ACCELERATOR (v5litepod-64),
# RUNTIME (v2-alpha-tpuv5-lite), PROJECT (gcloud default when empty).
# --dry-run prints every command instead of running it; --keep leaves the slice up.
set -euo pipefail

DRY_RUN=0
KEEP=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

TPU_NAME="${TPU_NAME:-xblip-${USER:-run}}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR="${ACCELERATOR:-v5litepod-64}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="xblip_jax_run"
LOG="train.log"

run() {
  # Prints the command (shell-quoted); runs it unless --dry-run.
  printf '%q ' "$@"; echo
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

# 1. Create the slice (spot/preemptible capacity sends SIGTERM; the trainer saves and stops).
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME"

# 2. Copy this checkout (tracked files only) to every worker.
ARCHIVE="/tmp/${TPU_NAME}-code.tar.gz"
run git -C "$REPO_DIR" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:/tmp/code.tar.gz" --zone "$ZONE" \
  "${PROJECT_FLAG[@]}" --worker=all
ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf /tmp/code.tar.gz -C $REMOTE_DIR"

# 3. Install: pinned requirements, then the TPU build of the same jax version.
ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
&& .venv/bin/pip install -q --no-deps -r requirements-nodeps.txt \
&& .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""

# 4. Run on all workers (jax.distributed.initialize() finds the slice's hosts itself).
QUOTED_EXTRA="$(printf '%q ' "${EXTRA[@]+"${EXTRA[@]}"}")"
ssh_all "cd $REMOTE_DIR && nohup .venv/bin/python -m xblip_jax.main --config $CONFIG \
--workdir $WORKDIR --config.distributed=True $QUOTED_EXTRA > $LOG 2>&1 &"

# 5. Tail worker 0's log until the run ends (process 0 writes the summaries).
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
  --command "cd $REMOTE_DIR && tail --pid=\$(pgrep -f xblip_jax.main | head -1) -f $LOG"

# 6. Delete the slice.
if [[ $KEEP -eq 0 ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
fi
