#!/bin/bash
# Multi-node pretraining with plain torchrun, for machines without SLURM: run this script once on
# every node, with the same HEAD, NNODES and RDZV_ID. torchrun starts NPROC_PER_NODE processes per
# node (one per GPU) and the nodes find each other through the c10d rendezvous on HEAD.
#
#   # on node 0 (10.0.0.1) and on node 1, the same command:
#   HEAD=10.0.0.1 NNODES=2 RDZV_ID=dino-vits scripts/slurm/torchrun_multinode.sh
#   HEAD=10.0.0.1 NNODES=2 RDZV_ID=dino-ep300 scripts/slurm/torchrun_multinode.sh trainer.max_epochs=300
#
# Arguments are appended to the pretrain command; edit RECIPE below for another method, backbone
# or dataset (a config group such as experiment= can be chosen once only). Requirements: the
# same code and environment on every node, HEAD:PORT reachable from every node (TCP), and RUN_DIR
# on storage all nodes share (rank 0 writes the checkpoints, every rank reads last.pt to resume).
#
# torchrun flags:
#   --nnodes=N             nodes to wait for (MIN:MAX for an elastic job, e.g. 2:4)
#   --nproc_per_node=8     processes (GPUs) per node
#   --rdzv_backend=c10d    the rendezvous is a TCP store served by the torchrun on HEAD: no etcd
#   --rdzv_endpoint=H:P    that store's address; every node must use the same one. It only
#                          brings the nodes together: ranks (and the process group's own
#                          MASTER_ADDR / port) are assigned by the rendezvous, so global rank 0
#                          is not necessarily on HEAD
#   --rdzv_id=ID           the job's name, the same on all nodes and new for each job, so a
#                          stale node of another job cannot join
#   --max_restarts=3       when any process fails, torchrun stops every process on every node and
#                          starts them all again (up to 3 times); they resume from last.pt
#                          (trainer.resume=auto, same RUN_DIR). Set trainer.ckpt_every_n_steps
#                          when epochs are long, or a restart repeats up to an epoch of work.
set -euo pipefail

HEAD=${HEAD:?set HEAD to node 0 host name or IP address (reachable from every node)}
NNODES=${NNODES:?set NNODES to the number of nodes}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
PORT=${PORT:-29500}
RDZV_ID=${RDZV_ID:-vfm-pretrain}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RUN_DIR=${RUN_DIR:-$PWD/outputs/multinode/$RDZV_ID}   # shared storage: the same path on every node

# global batch 1024 whatever NNODES x NPROC_PER_NODE (lr = optim.blr x 1024 / 256); raise
# trainer.accum_steps if a GPU runs out of memory
RECIPE=(
  experiment=dino_vit_small_imagenet
  dataset.root=/datasets/imagenet
  trainer.batch_size=1024
  trainer.num_workers=8
  trainer.progress=false
)

export OMP_NUM_THREADS=1
exec torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD:$PORT" \
  --rdzv_id="$RDZV_ID" \
  --max_restarts="$MAX_RESTARTS" \
  -m vfm.pretrain "${RECIPE[@]}" "$@" hydra.run.dir="$RUN_DIR"
