"""configs/gkd.py for a GPU: bfloat16 forward / backward over float32 master weights and Adam moments, a bfloat16
teacher, chunked losses (the default: never the [B, L, V] logits), the student's layers rematerialised to
their matmul outputs, and a GPU's budget: 2000 steps of batch 32 over 8192 built-in prompts, 128 new tokens. Same
recipe otherwise (on-policy GKD, JSD beta 0.5, lmbda ramping to 0.5).
    python scripts/train.py --config configs/gkd_gpu.py
    python scripts/train.py --config gkd_gpu.py --teacher path/to/teacher.gguf --config.train.batch_size=32
"""
from configs import gkd


def get_config():
    c = gkd.get_config()
    c.run_name = "gkd-smollm2-gpu"
    c.teacher.dtype = "bfloat16"
    c.student.dtype = "float32"       # the master copy: params and optimizer moments
    c.train.compute_dtype = "bfloat16"
    c.train.remat = "dots"
    c.loss.chunk_size = 256
    c.train.steps = 2000
    c.train.batch_size = 32
    c.data.source = "builtin:diverse:8192"
    c.policy.max_new_tokens = 128
    c.optim.learning_rate = 1e-4  # a longer run than the CPU sweep's (docs/RESULTS.md); not swept on a GPU yet
    c.optim.min_lr = 1e-5
    return c
