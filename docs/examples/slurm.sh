#!/bin/bash
# Multi-node pretraining under SLURM with Lightning's SLURM environment (detected from the
# srun environment: ranks, addresses and ports come from SLURM; nothing home-made).
# On preemption SLURM sends SIGUSR1 90 s before the time limit: every rank finishes its
# optimizer step, last.ckpt is written and rank 0 requeues the job as it exits (Lightning's
# default auto-requeue under SLURM); the requeued job resumes from last.ckpt by itself
# (--ckpt_path last_or_new). After a SIGTERM (scancel --signal=TERM) the last line requeues.
# The single-node form of this script is tested on a real cluster: docs/fault-tolerance.md.
#SBATCH --job-name=midtrain-pretrain  # not "bash"/"interactive": Lightning would not see SLURM
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # one task per GPU: must equal --trainer.devices
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append           # the requeued run appends to the same log
#SBATCH --output=slurm-%j.out

srun midtrain fit \
    --config configs/pretrain/paper.yaml \
    --config configs/strategy/fsdp2.yaml \
    --trainer.num_nodes 2 --trainer.devices 8 \
    --trainer.strategy.init_args.data_parallel_size 16 \
    --trainer.default_root_dir runs/paper/pretrain \
    --ckpt_path last_or_new
code=$?
if [ $code -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi  # preempted, not requeued yet
exit $code
