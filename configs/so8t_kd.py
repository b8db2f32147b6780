"""The SO8T seed's recipe: temperature-KL distillation, forward KL at tau 3 with the seed's weights
alpha 0.7 (kd), beta 0.3 (hard CE), gamma 0.1 (hidden matching), lambda_so8t 0.5 (relational), on dataset
completions (lmbda 0). lambda_safety 0.3 and lambda_verification 0.2 join with the SO(8) heads.

    python scripts/train.py --config configs/so8t_kd.py
"""
from so8t_jax import defaults as base


def get_config():
    c = base.get_config()
    c.run_name = "so8t-kd-smollm2"
    c.loss.divergence = "forward_kl"
    c.loss.temperature = 3.0
    c.loss.kd_weight = 0.7
    c.loss.ce_weight = 0.3
    c.loss.hidden_weight = 0.1
    c.loss.so8t_weight = 0.5
    c.policy.lmbda = 0.0
    return c
