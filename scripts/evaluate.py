"""Evaluate a finished run: teacher, student before and after distillation, on the run's held-out rows or on
any dataset file.

    python scripts/evaluate.py checkpoints/smoke [--rows 32]
    python scripts/evaluate.py checkpoints/smoke --data eval.jsonl [--rows 100]

Prints a table (KL, top-1, perplexity, greedy-match, accuracy per model) and writes
RUN_DIR/evaluation/metrics.json (RUN_DIR/evaluation/<file stem>/metrics.json with --data): every metric plus
a few side-by-side greedy samples.
"""
import argparse
import pathlib
import sys

from so8t_jax.config import ConfigError
from so8t_jax.evaluate import evaluate_run, format_table
from so8t_jax.rows import DataError
from so8t_jax.weights.common import WeightsError


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder (checkpoints/<run>/) holding distillation_results.json")
    ap.add_argument("--rows", type=int, default=None, help="evaluate only the first N rows")
    ap.add_argument("--data", default=None, help="a dataset file (JSONL / JSON / CSV / parquet in TRL's row formats) "
                                                 "to evaluate on instead of the run's held-out rows")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args()
    try:
        metrics = evaluate_run(args.run_dir, n_rows=args.rows, data_source=args.data)
    except (ConfigError, DataError, WeightsError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        sys.exit(f"error: {' '.join(str(e).split())}")
    counts = metrics["counts"]
    print(f"{metrics['run']}: {counts['rows']} {'rows of ' + args.data if args.data else 'held-out rows'} "
          f"({counts['reference_tokens']} reference tokens, {counts['rows_with_answer']} with an answer)")
    print(format_table(metrics))
    folder = pathlib.Path(args.run_dir) / "evaluation" / (pathlib.Path(args.data).stem if args.data else "")
    print(f"wrote {folder / 'metrics.json'}")


if __name__ == "__main__":
    main()
