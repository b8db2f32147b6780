"""Evaluate a finished run: teacher, student before and after distillation, on the run's held-out rows.

    python scripts/evaluate.py checkpoints/smoke [--rows 32]

Prints a table (KL, top-1, perplexity, greedy-match, accuracy per model) and writes
RUN_DIR/evaluation/metrics.json (every metric plus a few side-by-side greedy samples).
"""
import argparse
import pathlib

from so8t_jax.evaluate import evaluate_run, format_table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder (checkpoints/<run>/) holding distillation_results.json")
    ap.add_argument("--rows", type=int, default=None, help="evaluate only the first N held-out rows")
    args = ap.parse_args()
    metrics = evaluate_run(args.run_dir, n_rows=args.rows)
    counts = metrics["counts"]
    print(f"{metrics['run']}: {counts['rows']} held-out rows ({counts['reference_tokens']} reference tokens, "
          f"{counts['rows_with_answer']} with an answer)")
    print(format_table(metrics))
    print(f"wrote {pathlib.Path(args.run_dir) / 'evaluation' / 'metrics.json'}")


if __name__ == "__main__":
    main()
