"""Export a model (a run's student/ folder, a converted folder, an HF folder or a GGUF file) for deployment:

    python scripts/export.py SRC OUT_DIR [--gguf-type F32|F16|Q8_0] [--no-hf] [--no-gguf]

writes OUT_DIR/hf/ (transformers loads it) and OUT_DIR/student-<type>.gguf (llama.cpp loads it).
"""
import argparse

from so8t_jax.weights.export import export


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out_dir")
    ap.add_argument("--gguf-type", default="Q8_0", choices=["F32", "F16", "Q8_0"])
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face folder")
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF file")
    args = ap.parse_args()
    formats = [f for f, skip in (("hf", args.no_hf), ("gguf", args.no_gguf)) if not skip]
    if not formats:
        ap.error("nothing to export: both --no-hf and --no-gguf given")
    for path in export(args.src, args.out_dir, formats, args.gguf_type).values():
        print(path)


if __name__ == "__main__":
    main()
