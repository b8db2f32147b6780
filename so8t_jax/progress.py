"""Host-side progress: tensorboardX scalars and sample texts, a tqdm bar with loss, lr and tokens/s."""
from __future__ import annotations

import pathlib
import time

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class ProgressLogger:
    def __init__(self, tb_dir: pathlib.Path, total: int, initial: int = 0):
        self.writer = SummaryWriter(str(tb_dir))
        self.bar = tqdm(total=total, initial=initial, desc="distill", dynamic_ncols=True)
        self.last = time.perf_counter()

    def step(self, step: int, metrics: dict, tokens: int) -> None:
        now = time.perf_counter()
        tok_s = tokens / max(now - self.last, 1e-9)
        self.last = now
        self.scalars(step, {**{f"train/{k}": v for k, v in metrics.items()}, "train/tokens_per_s": tok_s})
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tok_s:.0f}")
        self.bar.update(1)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def samples(self, step: int, pairs) -> None:
        text = "\n\n".join(f"**prompt** {p}\n\n**student** {c}" for p, c in pairs)
        self.writer.add_text("samples", text, step)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
