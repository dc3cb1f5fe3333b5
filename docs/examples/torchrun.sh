#!/bin/bash
# Multi-node pretraining with torchrun (Lightning detects the TorchElastic environment).
# Run this on every node; NODE_RANK 0..NNODES-1, MASTER the address of node 0.
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-node0.example}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER:29500" \
    -m midtrain fit \
    --config configs/pretrain/paper.yaml \
    --config configs/strategy/fsdp2.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices 8 \
    --trainer.strategy.init_args.data_parallel_size $((NNODES * 8)) \
    --trainer.default_root_dir runs/paper/pretrain
