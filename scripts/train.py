"""Distil a teacher into a student: the main job.

    python scripts/train.py                                   # configs/gkd.py: SmolLM2 teacher, on-policy GKD
    python scripts/train.py --config configs/so8t_kd.py
    python scripts/train.py --config gkd.py --config.train.steps=1000 --config.policy.lmbda=0.7
    python scripts/train.py --config smoke.py --teacher model.gguf --output checkpoints --steps 20 --samples 200

--config takes a file or a bare name looked up in configs/. Shortcuts (the seed runner's flags): --teacher
(teacher.path), --output (output_dir), --steps (train.steps), --epochs (train.epochs), --samples (the N of
data.source=builtin:diverse:N), --resume / --noresume (train.resume).

Several processes (hosts), each started with the same arguments and parallel.mode=mesh: --coordinator
(process 0's host:port, or auto to let jax detect Slurm / Open MPI), --num_processes, --process_id (or
$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); README.md "Several hosts".
"""
import sys

from so8t_jax.cli import run_train

if __name__ == "__main__":
    sys.exit(run_train(sys.argv))
