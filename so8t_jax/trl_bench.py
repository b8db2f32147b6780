"""scripts/bench.py compare, TRL's side: a real GKDTrainer (the oracle extra's trl) on randomly initialised
transformers models of the compare shapes, timed per optimizer step. Only bench.py's torch child process runs it;
everything both sides share (shapes, batch, hyperparameters, the timer) comes from bench.py as arguments."""
from __future__ import annotations

import tempfile

from so8t_jax.config import ModelConfig


def torch_model(cfg: ModelConfig, device: str, dtype: str):
    """A randomly initialised transformers model of cfg's shape (export's hf_config), built on device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from so8t_jax.weights.export import hf_config
    hp = hf_config(cfg)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(hp.pop("model_type"), **hp),
                                                dtype=getattr(torch, dtype))


def make_trainer(t_cfg: ModelConfig, s_cfg: ModelConfig, args, lmbda: float, device: str, out_dir: str,
                 shared: dict, steps: int):
    """A real GKDTrainer on the compare shapes, its optimizer and scheduler created: weights and compute in
    --dtype (no autocast), gradient checkpointing off (SFTConfig turns both on by default); shared: the GKD and
    optimizer settings both sides use, steps: the cosine schedule's length."""
    import datasets
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # trl < 0.2x
        from trl import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))  # the batch is token ids
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>")
    config = GKDConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, lmbda=lmbda, max_steps=steps,
                       max_new_tokens=args.new, lr_scheduler_type="cosine", report_to=[], save_strategy="no",
                       use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False, **shared)
    trainer = GKDTrainer(model=torch_model(s_cfg, device, args.dtype), args=config, processing_class=tokenizer,
                         teacher_model=torch_model(t_cfg, device, args.dtype),
                         train_dataset=datasets.Dataset.from_dict({"unused": [0]}))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    return trainer


def step(trainer, batch) -> None:
    """What GKDTrainer.train does per optimizer step of one micro-batch: count the loss tokens, training_step
    (with probability lmbda the student generates; forward, generalized_jsd_loss, backward), clip, step, zero."""
    samples, n_items = trainer.get_batch_samples(iter([dict(batch)]), 1, trainer.args.device)
    trainer.training_step(trainer.model, samples[0], n_items)
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad()


def measure(t_cfg: ModelConfig, s_cfg: ModelConfig, args, lmbda: float, batch_np: dict, timer, shared: dict,
            steps: int) -> dict:
    """TRL's median step time (timer(run, repeats)) on CUDA when there is one, else the CPU, on batch_np (numpy
    arrays in the GKD collator's names); cuda_peak: torch's max_memory_allocated (None on a CPU)."""
    import torch
    import transformers
    import trl
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(t_cfg, s_cfg, args, lmbda, device, out_dir, shared, steps)
        batch = {k: torch.as_tensor(v, device=device) for k, v in batch_np.items()}

        def run():
            step(trainer, batch)
            if cuda:
                torch.cuda.synchronize()
        seconds = timer(run, args.repeats)
    return {"seconds": seconds, "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "platform": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}
