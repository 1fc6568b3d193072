#!/bin/bash
# Submit this run's scripts by hand, in order, with dependencies.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p /shared/dcslurm/logs/small-baseline/train /shared/dcslurm/logs/small-baseline/eval.run /shared/dcslurm/logs/small-baseline/eval.gather
JOB_0=$(sbatch --parsable train.sbatch | cut -d';' -f1)
echo "train.sbatch: job ${JOB_0}"
JOB_1=$(sbatch --parsable --dependency="afterok:${JOB_0}" eval.run.0000.sbatch | cut -d';' -f1)
echo "eval.run.0000.sbatch: job ${JOB_1}"
JOB_2=$(sbatch --parsable --dependency="afterok:${JOB_1}" eval.gather.sbatch | cut -d';' -f1)
echo "eval.gather.sbatch: job ${JOB_2}"
