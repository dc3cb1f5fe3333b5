#!/bin/bash
# Multi-node pretraining under SLURM with Lightning's SLURM environment (detected from the
# srun environment: ranks, addresses and ports come from SLURM; nothing home-made).
# On preemption SLURM sends SIGUSR1 90 s before the kill; Lightning saves an "hpc" checkpoint
# and requeues the job, which resumes from it automatically.
#SBATCH --job-name=midtrain-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # one task per GPU: must equal --trainer.devices
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

srun midtrain fit \
    --config configs/pretrain/paper.yaml \
    --config configs/strategy/fsdp2.yaml \
    --trainer.num_nodes 2 --trainer.devices 8 \
    --trainer.strategy.init_args.data_parallel_size 16 \
    --trainer.plugins+=lightning.pytorch.plugins.environments.SLURMEnvironment \
    --trainer.plugins.auto_requeue true \
    --trainer.default_root_dir runs/paper/pretrain
