"""configs/gkd.py for a GPU: bfloat16 forward / backward over float32 master weights and Adam moments, a bfloat16
teacher, chunked losses (the default: never the [B, L, V] logits), the student's layers rematerialised to
their matmul outputs. Same recipe otherwise (on-policy GKD, JSD beta 0.5, lmbda 0.5, 128 new tokens).
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
    return c
