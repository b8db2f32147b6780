"""The quality table: students trained by each recipe (kd, gkd with the lmbda schedule, on_policy, seq_kd) at
equal steps and tokens, evaluated with their teacher and their untrained selves on another source's prompts;
writes OUT/quality.json and (with --results) docs/RESULTS.md.

    python scripts/quality.py --budget cpu --eval-data ../shared/data/gsm8k_train.jsonl --results docs/RESULTS.md
    python scripts/quality.py --budget smoke --eval-data eval.jsonl --recipes kd,gkd

Recipes OUT/quality.json already holds for the same budget and evaluation are kept, not retrained: adding one to
the table (--recipes kd,gkd,on_policy after kd,gkd) trains only the new one; --fresh retrains all.
"""
import argparse
import json
import os
import pathlib
import platform
import sys

from so8t_jax import quality, runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(quality.BUDGETS), default="cpu")
    ap.add_argument("--eval-data", required=True, help="evaluation rows (JSONL in TRL's formats, or GSM8K's "
                                                       "question / answer)")
    ap.add_argument("--out", default="checkpoints/quality", help="runs and quality.json go here")
    ap.add_argument("--recipes", default=",".join(quality.RECIPES))
    ap.add_argument("--eval-rows", type=int, default=None)
    ap.add_argument("--results", default=None, help="also write this markdown file (docs/RESULTS.md)")
    ap.add_argument("--fresh", action="store_true", help="retrain recipes OUT/quality.json already has (by default "
                                                         "kept when budget and evaluation match)")
    ap.add_argument("--compare-select", action="store_true",
                    help="only compare student.select = kl with even: KL of each cut on rows the selection did not see")
    args = ap.parse_args()
    if args.compare_select:
        from so8t_jax.defaults import get_config
        print(json.dumps(quality.compare_selection(get_config())))
        return
    table = quality.run_quality(args.budget, args.eval_data, args.out, tuple(args.recipes.split(",")),
                                eval_rows=args.eval_rows, fresh=args.fresh)
    text = quality.results_markdown(table, " ".join(["python", "scripts/quality.py", *sys.argv[1:]]),
                                    f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores")
    print(text)
    if args.results:  # the generated section only; the rest of the file is kept
        path = pathlib.Path(args.results)
        runs.write_text(path, quality.with_section(path.read_text(encoding="utf-8") if path.exists() else "", text))


if __name__ == "__main__":
    main()
