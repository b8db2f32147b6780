"""A tiny CPU run (under a minute): SmolLM2 teacher, 2-layer student, short completions, a few steps.

    python scripts/train.py --config configs/smoke.py
"""
from so8t_jax import defaults as base


def get_config():
    c = base.get_config()
    c.run_name = "smoke"
    c.student.layers = 2
    c.data.source = "builtin:diverse:48"
    c.data.heldout_fraction = 0.2
    c.data.max_prompt_len = 64
    c.data.prompt_buckets = (64,)
    c.policy.lmbda = 0.5
    c.policy.max_new_tokens = 16
    c.train.steps = 6
    c.train.batch_size = 4
    c.train.eval_every = 3
    c.train.eval_batches = 1
    c.train.checkpoint_every = 3
    c.train.sample_every = 3
    c.stability.snapshot_every = 2
    c.optim.warmup_steps = 2
    c.optim.learning_rate = 1e-4
    return c
