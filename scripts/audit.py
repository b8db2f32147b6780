"""Show or verify a run's audit log (RUN_DIR/audit.sqlite, or the .sqlite file itself).

    python scripts/audit.py show RUN_DIR_OR_DB [--kind checkpoint] [--limit 20] [--json]
    python scripts/audit.py verify RUN_DIR_OR_DB
verify prints "OK: N events, chain intact" and exits 0, or prints each problem (a changed, removed, reordered or
added row; a truncated or damaged file) and exits 1. Exit 2: no such file, or not an audit log.
"""
import argparse
import json
import sys

from so8t_jax import audit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print events, one a line")
    show.add_argument("path")
    show.add_argument("--kind", default=None, help=f"only this kind ({', '.join(audit.KINDS)}, ...)")
    show.add_argument("--limit", type=int, default=None, help="only the latest N events")
    show.add_argument("--json", action="store_true", help="JSON lines")
    sub.add_parser("verify", help="recompute the hash chain").add_argument("path")
    args = ap.parse_args()
    try:
        if args.command == "verify":
            result = audit.verify(args.path)
            print("\n".join(result.problems + [f"FAILED: {result.n_events} events, {len(result.problems)} problem(s)"])
                  if result.problems else f"OK: {result.n_events} events, chain intact")
            sys.exit(0 if result.ok else 1)
        for e in audit.show(args.path, args.kind, args.limit):
            print(json.dumps(e, ensure_ascii=False) if args.json else
                  f"{e['seq']:>5}  {e['time']}  {e['kind']:<10}  {audit.canonical(e['payload'])}")
    except audit.AuditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
