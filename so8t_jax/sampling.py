"""Generation: one prefill forward into a preallocated KV cache, then a `lax.while_loop` decode (each step reads the
cache in place and writes only its token's slot: model.forward's decode path).

Token selection: a frozen (jit-static) `Sampler(temperature, top_k, top_p, min_p)`; pure filters set excluded
logits to -inf in transformers' order (temperature, top-k, top-p, min-p); temperature 0 is greedy (argmax).

`sample`: pure, jitted with (cfg, max_new_tokens, sampler, eos_ids, pad_id) static (`make_sample_fn`), so a train
step calls it with no host round trip. Prompts are LEFT-padded (at least one real token a row); positions are
cumsum(mask) - 1; the cache holds P + max_new_tokens slots. Rows stop at any of `eos_ids` (then emit pad_id) or
after max_new_tokens. Step i samples with fold_in(key, i): a fixed key reproduces the same tokens.

`generate(model, prompts, ...)`: encode, left-pad to a bucket, sample, decode to text; return_judgments=True (SO8T
heads) adds the safety head's judgment of each prompt and the verifier's per-token confidence.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import model as model_lib
from so8t_jax import quant, so8t
from so8t_jax.config import ModelConfig

PROMPT_BUCKET = 16  # generate() pads prompt lengths up to a multiple of this to bound recompiles


# ----------------------------------------------------------------------------------------------------------
# filters: pure functions of [..., V] logits; excluded entries become -inf, kept entries are unchanged


def top_k_filter(logits_BxV, k: int):
    """Keep the k largest logits of each row (ties with the k-th largest are kept too). k <= 0: no-op."""
    if k <= 0 or k >= logits_BxV.shape[-1]:
        return logits_BxV
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
    return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


def _sortable_int32(x):
    """float32 -> int32 with the same order (flip the magnitude bits of negatives), for exact bisection."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def top_p_filter(logits_BxV, p: float):
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least the most
    likely one): a token is kept when the mass of the tokens strictly more likely than it is < p (ties are
    kept or dropped together). p >= 1: no-op.

    No sort (slow on CPU for large vocabularies): the threshold is found by bisection over the logits' bit
    patterns, 32 masked sums over V; it is exact, since the mass above a key only changes at a logit."""
    if p >= 1.0:
        return logits_BxV
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    keys_BxV = _sortable_int32(logits_BxV)
    # invariant: mass above lo >= p (lo is too low a threshold), mass above hi < p (hi is high enough)
    lo_Bx1 = jnp.min(keys_BxV, axis=-1, keepdims=True) - 1
    hi_Bx1 = jnp.max(keys_BxV, axis=-1, keepdims=True)

    def bisect(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        high_enough = jnp.sum(jnp.where(keys_BxV > mid, probs_BxV, 0.0), axis=-1, keepdims=True) < p
        return jnp.where(high_enough, lo, mid), jnp.where(high_enough, mid, hi)

    _, hi_Bx1 = jax.lax.fori_loop(0, 32, bisect, (lo_Bx1, hi_Bx1))  # the key range spans < 2^32 values
    return jnp.where(keys_BxV >= hi_Bx1, logits_BxV, -jnp.inf)


def min_p_filter(logits_BxV, p: float):
    """Keep tokens whose probability is at least p times the top token's. p <= 0: no-op."""
    if p <= 0.0:
        return logits_BxV
    logits32 = logits_BxV.astype(jnp.float32)
    # prob_i >= p * prob_max  <=>  logit_i - logit_max >= log(p): no softmax needed
    keep = logits32 - jnp.max(logits32, axis=-1, keepdims=True) >= np.log(p)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def inverse_cdf_draw(u_B, logits_BxV):
    """Row r's token from softmax(logits_BxV[r]) by one uniform u_B[r] in [0, 1): the first index whose float32
    cumulative probability exceeds u * total (jax.random.categorical's Gumbel-max needs 49k random numbers a token,
    most of a CPU decode step's draw). -inf logits are never drawn; probabilities hold to ~1 fp32 ulp (6e-8)."""
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    target_Bx1 = (u_B.astype(jnp.float32) * cdf_BxV[:, -1])[:, None]
    return jnp.minimum(jnp.sum(cdf_BxV <= target_Bx1, axis=-1), logits_BxV.shape[-1] - 1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Token selection: `sampler(logits_BxV, key) -> tokens_B` (int32). temperature 0 is greedy (argmax,
    the filters are then irrelevant); otherwise logits / temperature, then top_k, top_p, min_p in turn
    (0, 1.0, 0.0 switch each off), then a categorical draw (inverse_cdf_draw). All in float32."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def filtered_logits(self, logits_BxV):
        """The float32 logits the categorical draw uses (temperature applied, excluded tokens -inf)."""
        logits_BxV = logits_BxV.astype(jnp.float32) / self.temperature
        logits_BxV = top_k_filter(logits_BxV, self.top_k)
        logits_BxV = top_p_filter(logits_BxV, self.top_p)
        return min_p_filter(logits_BxV, self.min_p)

    def __call__(self, logits_BxV, key):
        if self.greedy:
            return jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return inverse_cdf_draw(jax.random.uniform(key, logits_BxV.shape[:1]), self.filtered_logits(logits_BxV))

    def per_row(self, logits_BxV, keys_B):
        """Like __call__ with one key per row: a row's token does not depend on which other rows share its
        batch, so sampling split over devices draws what one device would."""
        if self.greedy:
            return self(logits_BxV, None)
        return inverse_cdf_draw(jax.vmap(jax.random.uniform)(keys_B), self.filtered_logits(logits_BxV))


GREEDY = Sampler()


# the compiled sampler


class SampleOutput(NamedTuple):
    """What `sample` returns (B rows, P prompt slots, N = max_new_tokens, L = P + N).

    tokens_BxN: generated ids; pad_id after a row's first EOS and for steps the loop never ran.
    mask_BxN: int32 completion validity, 1 up to and including the first EOS.
    lengths_B: generated tokens per row, EOS included (= mask_BxN.sum(1)).
    num_generated: scalar, loop steps run = max(lengths_B) (< N when every row stopped early).
    sequence_BxL: prompt then completion, [prompt_BxP, tokens_BxN] (left padding, then right padding).
    sequence_mask_BxL: [prompt_mask_BxP, mask_BxN]: every valid token; positions are cumsum(mask) - 1.
    completion_mask_BxL: [0, mask_BxN]: only the generated valid tokens (the GKD loss mask).
    logits_BxNxV: float32 logits each token was drawn from (before temperature and filters), only with
    return_logits=True, else None; rows are meaningful only where mask_BxN is 1.
    """
    tokens_BxN: jax.Array
    mask_BxN: jax.Array
    lengths_B: jax.Array
    num_generated: jax.Array
    sequence_BxL: jax.Array
    sequence_mask_BxL: jax.Array
    completion_mask_BxL: jax.Array
    logits_BxNxV: jax.Array | None = None


def _last_logits(params, cfg: ModelConfig, hidden_BxTxD):
    """float32 logits of the last position only (never the [B, T, V] block of a whole prompt)."""
    return quant.project(hidden_BxTxD[:, -1], model_lib.lm_head(params, cfg))  # [B, V]


def sample(params, cfg: ModelConfig, prompt_tokens_BxP, prompt_mask_BxP, key, *, max_new_tokens: int,
           sampler: Sampler = GREEDY, eos_ids: Sequence[int] = (), pad_id: int = 0, cache_dtype=None,
           return_logits: bool = False, row_ids_B=None) -> SampleOutput:
    """Generate up to max_new_tokens after left-padded prompts. Pure; jit with everything after `key`
    static (see make_sample_fn). key may be None for a greedy sampler. cache_dtype defaults to the
    embedding's dtype.

    Row r's token i is drawn with fold_in(fold_in(key, row_ids_B[r]), i) (row_ids_B defaults to 0..B-1): a
    row's sample depends on its id, not on the batch it shares, so a batch split over devices (passing each
    shard's global row ids) samples exactly what one device samples.

    LongRoPE models choose long or short rope factors by the cache capacity P + max_new_tokens (as
    llama.cpp does by n_ctx), so left padding and bucketing can move a short sequence past
    rope_original_max; transformers decides by the current length instead."""
    b, p = prompt_tokens_BxP.shape
    n = int(max_new_tokens)
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_tokens_BxP = prompt_tokens_BxP.astype(jnp.int32)
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    eos_E = jnp.asarray(sorted({int(e) for e in eos_ids}) or [-1], jnp.int32)  # -1 matches nothing
    cache_dtype = params["embed"].dtype if cache_dtype is None else cache_dtype

    row_keys_B = None
    if not sampler.greedy:
        row_ids_B = jnp.arange(b, dtype=jnp.int32) if row_ids_B is None else row_ids_B
        row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids_B)

    cache = model_lib.init_cache(cfg, b, p + n, cache_dtype)
    out = model_lib.forward(params, cfg, prompt_tokens_BxP, mask_BxT=prompt_mask_BxP, cache=cache,
                            logits=False)
    next_pos_B = jnp.sum(prompt_mask_BxP, axis=1)  # position of the first generated token

    def emit(i, logits_BxV, tokens_BxN, done_B, lengths_B, all_logits):
        """Draw step i's token from logits_BxV and record it (pad for rows already done)."""
        keys_B = None if sampler.greedy else jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, i)
        tok_B = jnp.where(done_B, pad_id, sampler.per_row(logits_BxV, keys_B))
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, tok_B[:, None], i, axis=1)
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.isin(tok_B, eos_E)
        if all_logits is not None:
            all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, logits_BxV[:, None], i, axis=1)
        return tok_B, tokens_BxN, done_B, lengths_B, all_logits

    logits0_BxV = _last_logits(params, cfg, out.hidden)
    all_logits = jnp.zeros((b, n, logits0_BxV.shape[-1]), jnp.float32) if return_logits else None
    state = (jnp.asarray(1, jnp.int32), out.cache,
             *emit(0, logits0_BxV, jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), bool),
                   jnp.zeros((b,), jnp.int32), all_logits))

    def cond(state):
        i, _, _, _, done_B, _, _ = state
        return (i < n) & ~jnp.all(done_B)

    def body(state):
        # Feed the previous token (a pad for finished rows: harmless, their outputs are discarded).
        i, cache, tok_B, tokens_BxN, done_B, lengths_B, all_logits = state
        pos_Bx1 = (next_pos_B + i - 1)[:, None]
        step = model_lib.forward(params, cfg, tok_B[:, None], positions_BxT=pos_Bx1, cache=cache, logits=False)
        return (i + 1, step.cache, *emit(i, _last_logits(params, cfg, step.hidden), tokens_BxN, done_B,
                                         lengths_B, all_logits))

    i, _, _, tokens_BxN, _, lengths_B, all_logits = jax.lax.while_loop(cond, body, state)
    mask_BxN = (jnp.arange(n)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    return SampleOutput(
        tokens_BxN=tokens_BxN, mask_BxN=mask_BxN, lengths_B=lengths_B, num_generated=i,
        sequence_BxL=jnp.concatenate([prompt_tokens_BxP, tokens_BxN], axis=1),
        sequence_mask_BxL=jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1),
        completion_mask_BxL=jnp.concatenate([jnp.zeros_like(prompt_mask_BxP), mask_BxN], axis=1),
        logits_BxNxV=all_logits)


@functools.lru_cache(maxsize=64)
def make_sample_fn(cfg: ModelConfig, max_new_tokens: int, sampler: Sampler = GREEDY,
                   eos_ids: tuple[int, ...] = (), pad_id: int = 0, cache_dtype=None,
                   return_logits: bool = False):
    """jit(sample) as a function of (params, prompt_BxP, mask_BxP, key) -> SampleOutput. Cached per static
    argument set; jit compiles once per (batch, prompt length) shape."""
    def fn(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> SampleOutput:
        return sample(params, cfg, prompt_tokens_BxP, prompt_mask_BxP, key, max_new_tokens=int(max_new_tokens),
                      sampler=sampler, eos_ids=tuple(eos_ids), pad_id=int(pad_id), cache_dtype=cache_dtype,
                      return_logits=return_logits)
    return jax.jit(fn)

# ----------------------------------------------------------------------------------------------------------
# host-side convenience


def bucket_length(n: int, multiple: int = PROMPT_BUCKET) -> int:
    """The padded prompt length generate() uses: n rounded up to a multiple of `multiple`."""
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (prompts) -> (tokens_BxP, mask_BxP) int32 arrays, right-aligned (left padding)."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, ids in enumerate(rows):
        if not 0 < len(ids) <= length:
            raise ValueError(f"prompt {r} has {len(ids)} tokens; need 1..{length}")
        tokens[r, length - len(ids):] = ids
        mask[r, length - len(ids):] = 1
    return tokens, mask


_TURN_MARKER = "so8tTurnMarker"


def turn_end_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (<|eot_id|>, <end_of_turn>, <|end|>,
    <|im_end|>, </s>): the first special token it writes after an assistant message's text. None without a
    template, or where the template writes no special token there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template may refuse this shape (jinja raise_exception): then no end token is known
        return None
    if not isinstance(text, str) or _TURN_MARKER not in text:
        return None
    tail = text[text.rindex(_TURN_MARKER) + len(_TURN_MARKER):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((int(i) for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special), None)


def eos_ids_of(model, chat: bool = True) -> tuple[int, ...]:
    """The ids that end a completion: the config's end ids, the tokenizer's eos_token_id and (chat) the chat
    template's turn end. The first is the one a completion ends with (the turn end in chat, else the
    tokenizer's EOS); the sampler stops on any. The one rule the sampler, the trainer and evaluation use."""
    ids = set(int(i) for i in model.config.eos_token_ids)
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    end = turn_end_id(model.tokenizer) if chat and model.tokenizer is not None else None
    if end is not None:
        ids.add(end)
    if not ids:
        return ()
    first = next(i for i in (end, tok_eos, min(ids)) if i is not None)
    return (int(first), *sorted(ids - {int(first)}))


def pad_id_of(model) -> int:
    """The id that fills padding: the config's pad_token_id, else the tokenizer's, else the smallest EOS id, else 0
    (it is always masked, so any id works; one rule keeps batches identical everywhere)."""
    tok_pad = getattr(model.tokenizer, "pad_token_id", None)
    return next((int(i) for i in (model.config.pad_token_id, tok_pad) if i is not None),
                min(eos_ids_of(model), default=0))


def as_prompt_list(prompts) -> list:
    """A single prompt (a string, or one conversation: a list of message dicts) becomes a list of one."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], dict)):
        return [prompts]
    return list(prompts)


@functools.lru_cache(maxsize=16)
def _judge_fn(cfg: ModelConfig, prompt_len: int):
    """jit: (params, tokens [B, L], mask [B, L]) -> (safety probs [B, 3], verifier confidence [B, N]), L = P + N:
    the safety head on the last prompt token, and for generated token j the verifier at the position that
    predicted it (P - 1 + j)."""
    def fn(params, tokens_BxL, mask_BxL):
        hidden = model_lib.forward(params, cfg, tokens_BxL, mask_BxT=mask_BxL, logits=False).hidden
        n = tokens_BxL.shape[1] - prompt_len
        safety = jax.nn.softmax(so8t.safety_logits(params, hidden[:, :prompt_len], mask_BxL[:, :prompt_len])) \
            if "safety_head" in params else jnp.zeros((tokens_BxL.shape[0], 3), jnp.float32)
        conf = jax.nn.sigmoid(so8t.verifier_logits(params, hidden[:, prompt_len - 1:prompt_len - 1 + n])) \
            if "verifier" in params else jnp.zeros((tokens_BxL.shape[0], n), jnp.float32)
        return safety, conf
    return jax.jit(fn)


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: int = 0, chat: bool = True,
             return_judgments: bool = False) -> list:
    """Complete each prompt (a string or a list of chat messages; a single one is accepted too) with a
    loaded `so8t_jax.Model`; returns the completions' text without the EOS. Greedy by default. The chat
    template is applied when `chat` and the tokenizer has one (loading.encode_prompt).

    return_judgments=True (the model must carry SO8T heads): one dict per prompt instead,
    {"text", "safety": "allow" | "escalate" | "deny", "safety_probs": {label: p}, "tokens": [generated ids],
    "confidence": [per generated token, sigmoid of the verifier: the student's confidence that it agrees with
    its teacher at that token]} ("safety" keys are None without a safety head, "confidence" without a
    verifier). tokens / confidence exclude the final EOS, like the text."""
    if return_judgments and not so8t.has_heads(model.params):
        raise ValueError(f"{model.source}: return_judgments needs a model with SO8T heads "
                         f"({so8t.HEADS_FILE} beside it, or a student trained with the safety / verification loss)")
    from so8t_jax.loading import encode_prompt

    prompts = as_prompt_list(prompts)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source}: the model has no tokenizer; use sample() on token ids")
    rows = [encode_prompt(tok, prompt, chat) for prompt in prompts]
    for r, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"prompt {r} encodes to no tokens")
    cfg = model.config
    pad_id = pad_id_of(model)
    eos_ids = eos_ids_of(model, chat)
    tokens_BxP, mask_BxP = left_pad(rows, bucket_length(max(len(ids) for ids in rows)), pad_id)
    fn = make_sample_fn(cfg, int(max_new_tokens), Sampler(temperature, top_k, top_p, min_p), eos_ids, pad_id)
    out = fn(model.params, jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP), jax.random.PRNGKey(seed))
    tokens_BxN, lengths_B = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    texts, kept = [], []
    for row, length in zip(tokens_BxN, lengths_B):
        ids: list[Any] = row[:length].tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        kept.append(ids)
        texts.append(tok.decode(ids, skip_special_tokens=True))
    if not return_judgments:
        return texts
    n = tokens_BxN.shape[1]
    mask_BxN = (np.arange(n)[None, :] < lengths_B[:, None]).astype(mask_BxP.dtype)
    safety, conf = jax.device_get(_judge_fn(cfg, tokens_BxP.shape[1])(
        model.params, jnp.concatenate([jnp.asarray(tokens_BxP), jnp.asarray(tokens_BxN)], axis=1),
        jnp.asarray(np.concatenate([mask_BxP, mask_BxN], axis=1))))
    has_safety, has_verifier = "safety_head" in model.params, "verifier" in model.params
    return [{"text": text, "tokens": ids,
             "safety": so8t.SAFETY_LABELS[int(np.argmax(p))] if has_safety else None,
             "safety_probs": dict(zip(so8t.SAFETY_LABELS, map(float, p))) if has_safety else None,
             "confidence": [float(x) for x in c[:len(ids)]] if has_verifier else None}
            for text, ids, p, c in zip(texts, kept, safety, conf)]
