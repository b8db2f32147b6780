"""Convert a teacher once: GGUF file or HF folder -> Orbax params + config JSON (+ tokenizer) in a folder.

    python scripts/convert.py SRC OUT_DIR [--dtype bfloat16]
`so8t_jax.load(OUT_DIR)` then reads it without dequantizing again.
"""
import argparse

import so8t_jax


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    print(so8t_jax.convert(args.src, args.out_dir, args.dtype))


if __name__ == "__main__":
    main()
