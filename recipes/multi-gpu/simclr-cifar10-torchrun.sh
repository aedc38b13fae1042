#!/bin/bash
# SimCLR on CIFAR-10 on NODES nodes x GPUS_PER_NODE GPUs with torchrun. Run the same command on every node
# (HOST: the first node's address); one node: bash recipes/multi-gpu/simclr-cifar10-torchrun.sh
# torchrun starts one process per GPU and Lightning reads its environment (no launcher of ours). The global
# batch stays the recipe's 512, so the recipe's learning rate holds; SyncBN makes BatchNorm see it whole.
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HOST=${HOST:-localhost}

torchrun --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d --rdzv-endpoint "$HOST:29500" \
  -m ssl_toolkit.cli pretrain --config recipes/simclr/cifar10.yaml \
  --trainer.num_nodes "$NODES" --trainer.devices "$GPUS_PER_NODE" --trainer.strategy ddp \
  --trainer.sync_batchnorm true --data.init_args.batch_size $((512 / (NODES * GPUS_PER_NODE)))
