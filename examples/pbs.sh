#!/bin/bash
# A phalanx job under PBS with mpiexec: the coordinator on the first node, one worker per rank.
#PBS -N phalanx
#PBS -l select=4:ncpus=8
#PBS -l walltime=24:00:00
set -euo pipefail
cd "$PBS_O_WORKDIR"
CONFIG=${CONFIG:-configs/shakespeare-char.toml}
export PHALANX_JOB_TOKEN=${PHALANX_JOB_TOKEN:-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
NRANKS=$(wc -l < "$PBS_NODEFILE")
head_node=$(head -n1 "$PBS_NODEFILE")
ssh "$head_node" "cd $PBS_O_WORKDIR && PHALANX_JOB_TOKEN=$PHALANX_JOB_TOKEN phalanx coordinator --bind 0.0.0.0:7070 --world $NRANKS --config $CONFIG" &
sleep 2
# mpiexec sets PMI_RANK/PMI_SIZE, which workers log as hints.
mpiexec -n "$NRANKS" --ppn 1 --env PHALANX_JOB_TOKEN "$PHALANX_JOB_TOKEN" \
  phalanx worker --coordinator "http://$head_node:7070" --config "$CONFIG"
