"""Convert a teacher once: GGUF file or HF folder -> Orbax params + config JSON (+ tokenizer) in a folder.

    python scripts/convert.py SRC OUT_DIR [--dtype bfloat16]
`so8t_jax.load(OUT_DIR)` then reads it without dequantizing again.

    python scripts/convert.py SRC.gguf OUT.gguf --requantize Q4_0
A GGUF copy whose quantized tensors gguf.quants re-quantizes to Q4_0 (or Q4_1, Q8_0); metadata and F32 tensors as
they are (so8t_jax.quant.requantize_gguf). Each requantization loses precision.
"""
import argparse

import so8t_jax
from so8t_jax import quant


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--requantize", default="", choices=["", "Q4_0", "Q4_1", "Q8_0"],
                    help="write OUT as a GGUF file re-quantized to this type instead")
    args = ap.parse_args()
    if args.requantize:
        print(quant.requantize_gguf(args.src, args.out_dir, args.requantize))
    else:
        print(so8t_jax.convert(args.src, args.out_dir, args.dtype))


if __name__ == "__main__":
    main()
