"""The SO8T seed's recipe: temperature-KL distillation, forward KL at tau 3 with the seed's weights
alpha 0.7 (kd), beta 0.3 (hard CE), gamma 0.1 (hidden matching), lambda_so8t 0.5 (relational Gram),
lambda_safety 0.3 (safety head) and lambda_verification 0.2 (verifier head), on dataset completions (lmbda 0),
with SO(8) rotation gates on every attention and MLP output. The alpha schedule's formula is in
so8t_jax/defaults.py (the so8t block): -5 -> -2 over the first 5 % of steps, then a sigmoid ramp to 1.6.
Export folds the gates into o_proj / down_proj (a plain model of the teacher's family); the heads are saved
beside it as so8t_heads.safetensors, which so8t_jax.load restores.

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
    c.loss.safety_weight = 0.3
    c.loss.verification_weight = 0.2
    c.so8t.gates = True
    c.policy.lmbda = 0.0
    return c
