"""A transformers fast tokenizer -> GGUF tokenizer metadata (tokenizer.ggml.*), as llama.cpp's convert_hf_to_gguf.py
writes it, for the two kinds llama.cpp tokenizes the way the HF tokenizer does:

- byte-level BPE ("gpt2": Qwen2, Llama 3, SmolLM2): tokens, token types, merges, and the pre-tokenizer's name,
  known only for the split regexes listed in _SPLITS;
- SentencePiece-style BPE with byte fallback ("llama": Llama 2 / TinyLlama, Mistral, Phi-3, Gemma 3): tokens,
  scores, token types and add_space_prefix. The scores are what llama.cpp merges by (the best-scoring adjacent
  pair first): the HF merge rank of each token, so llama.cpp's merge order is the HF tokenizer's.

Special ids, add_bos / add_eos and the chat template go through gguf's SpecialVocab (from the tokenizer saved to
a temporary folder), with the ids the model config states and the BOS / EOS the tokenizer really adds on encode
taking precedence. `check_exportable` says, before any training, why a tokenizer cannot be written.
"""
from __future__ import annotations

import json
import re
import tempfile

import gguf

# llama.cpp's pre-tokenizer names for the split regexes transformers' GGUF loader knows (tokenizer.json spelling)
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+": "llama-bpe",
}
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space
# the converter's scores: added tokens -1000, ids no token uses -10000; byte / unknown pieces 0 (SentencePiece's)
ADDED_SCORE, UNUSED_SCORE = -1000.0, -10000.0


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's tokenizer.json
    if backend is None:
        raise NotImplementedError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; only fast tokenizers "
                                  f"(tokenizer.json) are written to GGUF")
    return json.loads(backend.to_str())


def _steps(node: dict | None, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer as a flat list of its steps (Sequence nodes opened)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node[key] for s in _steps(child, key)]
    return [node]


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    steps = _steps(pre, "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") in _SPLITS \
            and not steps[1].get("use_regex", True):
        return _SPLITS[steps[0]["pattern"]["Regex"]]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise NotImplementedError(f"no llama.cpp pre-tokenizer name is known for the byte-level pre-tokenizer "
                              f"{json.dumps(pre)[:300]}")


def _space_prefix(spec: dict) -> bool:
    """Whether llama.cpp's SentencePiece tokenizer must put a space before the text (add_space_prefix): the
    normalizer / pre-tokenizer pairs transformers and the Hub's tokenizer.json files use for SentencePiece BPE.
    llama.cpp replaces only spaces with U+2581 and merges the whole text; anything else has no GGUF spelling."""
    prepend = {"type": "Prepend", "prepend": SPACE}
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    norms = _steps(spec.get("normalizer"), "normalizers")
    pres = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if norms == [prepend, escape] and not pres:  # Llama 2 / Phi-3 tokenizer.json ("legacy")
        return True
    # Gemma: spaces escaped, no prefix; its Split on " " (after the escape) splits nothing
    no_op_split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    if norms == [escape] and pres in ([], [no_op_split]):
        return False
    if not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace" \
            and pres[0].get("replacement") == SPACE and pres[0].get("split") is False:
        return pres[0].get("prepend_scheme", "always") != "never"  # transformers' LlamaTokenizer
    raise NotImplementedError(f"its normalizer {json.dumps(spec.get('normalizer'))[:200]} and pre-tokenizer "
                              f"{json.dumps(spec.get('pre_tokenizer'))[:200]} do not match llama.cpp's SentencePiece "
                              f"tokenizer (spaces to U+2581, an optional leading U+2581, no other splitting)")


def _kind(spec: dict) -> tuple[str, str, bool | None]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre, add_space_prefix) or NotImplementedError saying why not."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotImplementedError(f"its tokenizer model is {model.get('type')}, and only BPE (byte-level, or "
                                  f"SentencePiece-style with byte fallback) tokenizes alike in llama.cpp")
    if '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2", _pre_tokenizer_name(spec), None
    if not model.get("byte_fallback"):
        raise NotImplementedError("it is a SentencePiece-style BPE without byte fallback, which llama.cpp's "
                                  "SentencePiece tokenizer (unknown characters to <0xXX> byte tokens) does not match")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in model.get("vocab", {})]
    if missing:
        raise NotImplementedError(f"its vocabulary lacks {len(missing)} of the 256 byte tokens (first "
                                  f"<0x{missing[0]:02X}>) that llama.cpp's byte fallback needs")
    odd = {k: model[k] for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")
           if model.get(k)}
    if odd:
        raise NotImplementedError(f"its BPE sets {odd}, which llama.cpp's SentencePiece tokenizer has no setting for")
    return "llama", "default", _space_prefix(spec)


def check_exportable(tokenizer) -> str | None:
    """Why `tokenizer` cannot be written into a GGUF file (one line), or None when it can (or is None)."""
    if tokenizer is None:
        return None
    try:
        _kind(_spec(tokenizer))
    except NotImplementedError as e:
        return str(e)
    return None


def _looks_special(token: str) -> bool:
    """Added tokens some models leave non-special but llama.cpp must treat as control tokens (the converter's
    does_token_look_special)."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>")) \
        or (token.startswith("<unused") and token.endswith(">"))


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _vocab_lists(tokenizer, spec: dict, n_vocab: int, sentencepiece: bool):
    """(tokens, scores, token types) for ids 0..n_vocab-1 as the converter lays them out: ids no token uses are
    [PAD<id>] UNUSED; added tokens CONTROL when special (or looking special), else USER_DEFINED with U+2581
    written as a space (llama.cpp matches them in the raw text); SentencePiece vocabularies also mark <0xXX>
    BYTE and the unknown piece UNKNOWN, and score each token by minus the rank of the HF merge that makes it
    (unmade pieces below every merge), so llama.cpp merges pairs in the HF tokenizer's order.

    Written here, not with gguf.vocab: its SentencePieceVocab needs the tokenizer.model file (a tokenizer read
    from a GGUF or a tokenizer.json has none) and its LlamaHfVocab scores every token -1000, which leaves
    llama.cpp no merge order."""
    vocab, added = tokenizer.get_vocab(), tokenizer.added_tokens_decoder
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"export_gguf: the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                         f"is {n_vocab}")
    model = spec["model"]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(_merges(model) if sentencepiece else []):
        rank.setdefault(a + b, r)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores, types = [UNUSED_SCORE] * n_vocab, [gguf.TokenType.UNUSED] * n_vocab
    for token, i in vocab.items():
        if i in added:
            special = added[i].special or _looks_special(token)
            tokens[i] = token if special or not sentencepiece else token.replace(SPACE, " ")
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            scores[i] = ADDED_SCORE
            continue
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
        if sentencepiece and _BYTE.fullmatch(token):
            types[i], scores[i] = gguf.TokenType.BYTE, 0.0
        elif sentencepiece and token == model.get("unk_token"):
            types[i], scores[i] = gguf.TokenType.UNKNOWN, 0.0
        else:
            scores[i] = -float(rank[token] if token in rank else len(rank) + i)
    return tokens, scores, types


def _special_vocab(cfg, tokenizer, load_merges: bool) -> gguf.SpecialVocab:
    """gguf's SpecialVocab over the tokenizer's saved files, with the model config's BOS / EOS / EOT / pad ids and
    the BOS / EOS the tokenizer adds on encode put over what it read."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=load_merges, n_vocab=cfg.vocab_size)
    eos = list(cfg.eos_token_ids) or [tokenizer.eos_token_id]
    eos.sort(key=lambda e: e != tokenizer.eos_token_id)  # the tokenizer's own EOS first, then EOT
    ids = {"bos": cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id,
           "eos": eos[0], "eot": eos[1] if len(eos) > 1 else None, "unk": tokenizer.unk_token_id,
           "pad": cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id}
    special.special_token_ids.update({k: int(v) for k, v in ids.items() if v is not None})
    # what the tokenizer really does: SpecialVocab parses only simple post-processor templates
    encoded = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    special.add_special_token["bos"] = ids["bos"] is not None and encoded[:1] == [ids["bos"]]
    special.add_special_token["eos"] = encoded[-1:] == [tokenizer.eos_token_id] and len(encoded) > 1
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        special.chat_template = tokenizer.chat_template
    return special


def add_tokenizer(w: gguf.GGUFWriter, cfg, tokenizer) -> None:
    """Write tokenizer.ggml.* for `tokenizer` (a transformers fast tokenizer) and model config `cfg`, or raise
    NotImplementedError (check_exportable's reason) before writing anything."""
    spec = _spec(tokenizer)
    try:
        model, pre, space_prefix = _kind(spec)
    except NotImplementedError as e:
        raise NotImplementedError(f"export_gguf: the tokenizer cannot be written to GGUF: {e}. Pass tokenizer=None, "
                                  f"or export HF only") from None
    sentencepiece = model == "llama"
    tokens, scores, types = _vocab_lists(tokenizer, spec, cfg.vocab_size, sentencepiece)
    special = _special_vocab(cfg, tokenizer, load_merges=not sentencepiece)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if sentencepiece:
        w.add_token_scores(scores)
        w.add_add_space_prefix(space_prefix)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
