#!/bin/bash
# A phalanx job under PBS with mpiexec: the coordinator on the first node, one worker per rank.
#   qsub examples/pbs.sh   (overrides: qsub -v OVERRIDES="train.max_steps=100" examples/pbs.sh)
# The shipped config runs on 1 to 4 ranks (its 16 sequences per step in 4 micro-batches).
#PBS -N phalanx
#PBS -l select=4:ncpus=8
#PBS -l walltime=24:00:00
set -euo pipefail
cd "$PBS_O_WORKDIR"
CONFIG=${CONFIG:-configs/shakespeare-char.toml}
PHALANX=${PHALANX:-phalanx}
read -r -a overrides <<< "${OVERRIDES:-}"
# Like torchrun: MASTER_PORT is the coordinator's port.
export MASTER_PORT=${MASTER_PORT:-7070}
export PHALANX_JOB_TOKEN=${PHALANX_JOB_TOKEN:-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
NRANKS=$(wc -l < "$PBS_NODEFILE")
head_node=$(head -n1 "$PBS_NODEFILE")
# The coordinator goes when the job script ends.
ssh "$head_node" "cd $PBS_O_WORKDIR && PHALANX_JOB_TOKEN=$PHALANX_JOB_TOKEN $PHALANX coordinator --bind 0.0.0.0:$MASTER_PORT --world $NRANKS --config $CONFIG ${overrides[*]:-}" &
coordinator=$!
trap 'kill "$coordinator" 2>/dev/null || true' EXIT
# mpiexec sets PMI_RANK/PMI_SIZE (workers log them as hints) and PALS_LOCAL_RANKID or
# PMI_LOCAL_RANK (a worker's GPU); workers retry until the coordinator answers.
mpiexec -n "$NRANKS" --ppn 1 --env PHALANX_JOB_TOKEN "$PHALANX_JOB_TOKEN" \
  "$PHALANX" worker --coordinator "http://$head_node:$MASTER_PORT" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"}
