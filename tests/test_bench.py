"""scripts/bench.py compare (TRL's GKDTrainer step vs ours, each in its own process), the Qwen2 presets it runs
at, and scripts/device_check.sh (its CPU smoke path; a timeout fails it)."""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

from so8t_jax import bench
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.weights.export import hf_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--teacher-layers", "2", "--student-layers", "1", "--vocab", "512", "--batch", "2", "--prompt-len", "4",
        "--new", "4", "--repeats", "1"]


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("name, n_params", [("qwen2-0.5b", 494_032_768), ("qwen2-7b", 7_615_616_512)])
def test_qwen2_presets_have_the_published_sizes(name, n_params):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = ModelConfig.preset(name)
    shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    assert model_lib.count_params(shapes) == n_params
    hp = hf_config(cfg)
    with torch.device("meta"):  # transformers' Qwen2 of the same config: the same parameter count
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(hp.pop("model_type"), **hp))
    assert sum(p.numel() for p in hf.parameters()) == n_params
    assert (cfg.attn_bias, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (True, 1e6, 1e-6, name == "qwen2-0.5b")


def test_compare_configs_share_one_vocabulary():
    args = argparse.Namespace(teacher_preset="qwen2-7b", teacher_layers=0, student_preset="qwen2-0.5b",
                              student_layers=8, vocab=0)
    t_cfg, s_cfg = bench.compare_configs(args)
    assert (t_cfg.vocab_size, s_cfg.vocab_size) == (151936, 151936)
    assert (t_cfg.n_layers, t_cfg.d_model, s_cfg.n_layers, s_cfg.d_model) == (28, 3584, 24, 896)
    args = argparse.Namespace(teacher_preset="smollm2-135m", teacher_layers=2, student_preset="", student_layers=1,
                              vocab=512)
    t_cfg, s_cfg = bench.compare_configs(args)
    assert (t_cfg.n_layers, s_cfg.n_layers, s_cfg.d_model, t_cfg.vocab_size, s_cfg.vocab_size) == (2, 1, 576, 512, 512)


def test_compare_runs_trl_and_ours_and_prints_the_ratios():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "compare", *TINY],
                         stdout=subprocess.PIPE, text=True, check=True, timeout=300).stdout
    rows = _rows(out)
    steps, ratio = rows[:-1], rows[-1]
    assert [(r["bench"], r["framework"], r["lmbda"]) for r in steps] == [
        ("gkd_step", f, lmbda) for f in ("trl", "so8t_jax") for lmbda in (0.0, 1.0)]
    for r in steps:
        assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0, r
        assert (r["teacher_layers"], r["student_layers"], r["vocab"], r["batch"], r["new_tokens"]) == (2, 1, 512, 2, 4)
    ours = [r for r in steps if r["framework"] == "so8t_jax"]
    assert all(r["temp_bytes"] > 0 and "remat" in r and "loss_chunk" in r for r in ours)
    # one model-FLOP count per lmbda for both frameworks (flops.py); ours also counts its program (remat full
    # recomputes the student's layers, the chunked losses both output layers: more than the model FLOPs)
    for lmbda in (0.0, 1.0):
        trl, mine = (next(r for r in steps if (r["framework"], r["lmbda"]) == (f, lmbda)) for f in ("trl", "so8t_jax"))
        assert trl["model_flops"] == mine["model_flops"] < mine["program_flops"]
        assert "mfu" not in mine  # a CPU: no peak to divide by
    assert ours[1]["model_flops"] > ours[0]["model_flops"]  # the sampling
    assert ratio["bench"] == "compare_ratio"
    for key in ("time_trl_over_ours_lmbda_0", "time_trl_over_ours_lmbda_1", "memory_trl_over_ours_lmbda_0",
                "memory_trl_over_ours_lmbda_1"):
        assert ratio[key] > 0


def _device_check(tmp_path, **env) -> subprocess.CompletedProcess:
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: device_check.sh would run its full-size check")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE_CHECK_TINY": "1", **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=600)


def test_device_check_fails_loudly_past_a_timeout(tmp_path):
    done = _device_check(tmp_path, COMPARE_TIMEOUT="1")
    assert done.returncode == 124, done.stderr[-2000:]  # timeout's status, through pipefail and set -e
    assert "done in" not in done.stdout


def test_device_check_needs_a_gpu_unless_tiny(tmp_path):
    done = _device_check(tmp_path, DEVICE_CHECK_TINY="0")
    assert done.returncode == 1 and "no GPU" in done.stderr


@pytest.mark.slow
def test_device_check_tiny_path_runs_on_cpu(tmp_path):
    done = _device_check(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows((tmp_path / "device_check.jsonl").read_text())
    assert [r["bench"] for r in rows] == ["gkd_step"] * 4 + ["compare_ratio", "quantized_step", "step", "step"]
    assert all(r["date"] and r["device_name"].startswith("cpu") and "scripts/bench.py" in r["command"] for r in rows)
    assert rows[0]["teacher"] == "smollm2-135m" and rows[0]["student_layers"] == 2 and rows[0]["batch"] == 2
