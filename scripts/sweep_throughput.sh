#!/usr/bin/env bash
# Trials per hour of one small sweep with 1 worker, then with N (default auto: one per GPU), and
# the GPU each worker ran on. Run from a checkout:
#   bash scripts/sweep_throughput.sh                  # n_jobs=auto against 1
#   N=4 TRIALS=16 bash scripts/sweep_throughput.sh    # 4 workers (several per GPU on fewer GPUs)
#   bash scripts/sweep_throughput.sh model=cnn dataset=fake trainer.epochs=3   # another task
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${TRIALS:-12}
out=${OUT:-$(mktemp -d)}
task=("$@")
[ ${#task[@]} -gt 0 ] || task=(dataset=fake model=fc trainer.epochs=2 logger=none dataset.val_size=64)
for n in 1 "${N:-auto}"; do
    dir="$out/n_jobs-$n"
    start=$(date +%s.%N)
    python run.py -m sweep=lr "${task[@]}" hydra.sweeper.n_trials="$trials" hydra.sweeper.n_jobs="$n" \
        hydra.sweeper.confirm_seeds=0 hydra/sweeper/pruner=none hydra.sweep.dir="$dir" \
        >"$dir.log" 2>&1
    end=$(date +%s.%N)
    python - "$dir" "$n" "$trials" "$start" "$end" <<'PY'
import sys
import optuna
from collections import Counter
d, n, trials, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:])
study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{d}/optuna.db")[0],
                          storage=f"sqlite:///{d}/optuna.db")
workers = Counter((t.user_attrs["fdfa:worker"]["pid"], t.user_attrs["fdfa:worker"]["gpu"])
                  for t in study.trials)
print(f"n_jobs={n}: {trials} trials in {end - start:.1f} s = {trials * 3600 / (end - start):.0f}"
      f" trials/hour; trials per (worker pid, GPU): {dict(workers)}")
PY
done
