"""Print a model's config, parameter count and the top-k next tokens for a prompt.

    python scripts/describe.py PATH [--prompt "What is the capital of France?"] [--k 5] [--raw]
PATH: a GGUF file, a Hugging Face folder, or a folder written by scripts/convert.py.
"""
import argparse
import json

import so8t_jax
from so8t_jax.loading import describe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--raw", action="store_true", help="encode the prompt as plain text, no chat template")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    info = describe(so8t_jax.load(args.path, args.dtype), args.prompt, args.k, chat=not args.raw)
    print(json.dumps(info, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
