#!/usr/bin/env bash
# One Optuna study, many SLURM array tasks: each task is one sweep worker (n_jobs=auto: one per GPU
# it was given) on the shared study; together they finish hydra.sweeper.n_trials exactly.
#
#   sbatch --array=0-7 scripts/slurm_array.sh sweep=fdfa experiment=cifar100_alexnet \
#       hydra.sweeper.n_trials=60
#
# Every array task runs `fdfa -m ARGS` with one sweep dir and one study for the whole array (a
# journal file on the shared filesystem; or set FDFA_STORAGE=postgresql://user:pw@dbhost/fdfa).
# On a time limit SLURM sends SIGTERM 120 s ahead (--signal=B:TERM@120), on preemption at once: the
# worker hands its running trial back to the study (failed as abandoned, queued again at once) and
# exits. A preempted task comes back by itself with --requeue (where the cluster requeues on
# preemption); with FDFA_REQUEUE=1 the task also requeues itself on SIGTERM (time limits).
#SBATCH --job-name=fdfa-sweep
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail

FDFA=${FDFA:-fdfa}  # the command; e.g. FDFA="python run.py" in a checkout
study=${FDFA_STUDY:-sweep-${SLURM_ARRAY_JOB_ID:-local}}  # one name for every task of the array
dir=${FDFA_SWEEP_DIR:-multirun/$study}  # on the shared filesystem: every task writes trials here
storage=${FDFA_STORAGE:-journal:$dir/optuna.journal}

echo "array task ${SLURM_ARRAY_TASK_ID:-?} of study $study ($storage) on $(hostname)"
# shellcheck disable=SC2086  # FDFA may be a command with arguments
$FDFA -m "$@" hydra.sweep.dir="$dir" hydra.sweeper.study_name="$study" \
    hydra.sweeper.storage="$storage" hydra.sweeper.n_jobs=auto &
worker=$!
on_term() {  # B:TERM reaches this shell only: pass it on to the worker
    kill -TERM "$worker" 2>/dev/null || true
    if [ "${FDFA_REQUEUE:-0}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
    fi
}
trap on_term TERM
while :; do  # a trap ends `wait` early: wait again until the worker has handed back and exited
    status=0
    wait "$worker" || status=$?
    kill -0 "$worker" 2>/dev/null || break
done
exit "$status"
