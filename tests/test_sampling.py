"""Sampling: cached decode vs full forward, greedy parity with transformers (tiny models of every family and
the real SmolLM2 GGUF), the filters against transformers' logits warpers, draw statistics, EOS handling."""

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest
import torch
from fixtures import make_hf_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax import sampling
from so8t_jax.loading import smollm2_gguf
from so8t_jax.sampling import Sampler, min_p_filter, top_k_filter, top_p_filter

FAMILIES = ("llama", "qwen2", "phi3", "phi3_longrope", "gemma3")
EOS = 2  # the fixture tokenizer's <|im_end|>
MIN_MARGIN = 1e-3  # greedy parity is only meaningful where the top-2 logit gap exceeds fp noise


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_hf_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {fam: so8t_jax.load(folder) for fam, folder in folders.items()}


def _left_padded(lengths, vocab, seed):
    """Random prompts (ids >= 3: no special tokens) of the given lengths, left-padded to the longest."""
    rng = np.random.RandomState(seed)
    rows = [rng.randint(3, vocab, n).tolist() for n in lengths]
    tokens, mask = sampling.left_pad(rows, max(lengths))
    return rows, tokens, mask


def _top2_gap(logits_BxNxV, mask_BxN):
    top2 = np.sort(np.asarray(logits_BxNxV), axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    return gap[np.asarray(mask_BxN).astype(bool)].min()


# ---------------------------------------------------------------------------------------------------------
# cached decode == full forward; greedy == transformers' greedy generate


# (family, prompt length, new tokens). Batches hold two prompts: this length and 3 shorter (left-padded).
# phi3_longrope: 6 + 10 <= 16 keeps short factors everywhere, prompts over 16 take long factors everywhere
# (ours decides by the cache capacity P + N, transformers by the sequence length). gemma3 generates far past
# its sliding window of 4.
GREEDY_CASES = [("llama", 8, 12), ("qwen2", 8, 12), ("phi3", 8, 12), ("phi3_longrope", 6, 10),
                ("phi3_longrope", 20, 10), ("gemma3", 8, 12)]


@pytest.fixture(scope="module")
def greedy_run(models):
    """(family, P, N) -> (prompt rows, SampleOutput with logits) of a greedy run stopping at EOS; computed
    once, shared by the two tests below so each case compiles its sampler once."""
    runs = {}

    def run(family, prompt_len, new):
        if (family, prompt_len, new) not in runs:
            m = models[family]
            rows, tokens, mask = _left_padded([prompt_len, prompt_len - 3], m.config.vocab_size, seed=0)
            fn = sampling.make_sample_fn(m.config, new, sampling.GREEDY, (EOS,), 0, return_logits=True)
            runs[family, prompt_len, new] = rows, fn(m.params, tokens, mask, jax.random.PRNGKey(0))
        return runs[family, prompt_len, new]
    return run


def _full_forward_error(m, out, prompt_len):
    """max |decode logits - full-forward logits| over valid steps, and the logits' scale."""
    full = jax.jit(lambda p, s, mk: model_lib.forward(p, m.config, s, mask_BxT=mk).logits)(
        m.params, out.sequence_BxL, out.sequence_mask_BxL)
    new = out.tokens_BxN.shape[1]
    # logits at the last prompt slot and at each generated token but the last predict the N new tokens
    ref = np.asarray(full)[:, prompt_len - 1:prompt_len + new - 1]
    valid = np.asarray(out.mask_BxN).astype(bool)
    diff = np.abs(np.asarray(out.logits_BxNxV) - ref)[valid]
    return diff.max(), np.abs(ref[valid]).max()


@pytest.mark.parametrize("family,prompt_len,new", GREEDY_CASES)
def test_cached_decode_matches_full_forward(models, greedy_run, family, prompt_len, new):
    m = models[family]
    _, out = greedy_run(family, prompt_len, new)
    assert np.asarray(out.lengths_B).min() >= 6  # a real generation, for both rows
    err, scale = _full_forward_error(m, out, prompt_len)
    print(f"{family} P={prompt_len} N={new}: max |cached - full| = {err:.2e} (max |logit| {scale:.1f})")
    assert scale > 5.0 and err <= 1e-5 * scale


@pytest.fixture(scope="module")
def gemma3_sampled(models):
    """A sampled run (temperature 10: this tiny gemma3 is very peaked) of 12 tokens after three prompts, two
    left-padded, with no EOS: (tokens, mask, key, SampleOutput with logits)."""
    m = models["gemma3"]
    _, tokens, mask = _left_padded([7, 4, 2], m.config.vocab_size, seed=1)
    key = jax.random.PRNGKey(0)
    fn = sampling.make_sample_fn(m.config, 12, Sampler(temperature=10.0), (), 0, return_logits=True)
    return tokens, mask, key, fn(m.params, tokens, mask, key)


def test_sampled_decode_matches_full_forward(models, gemma3_sampled):
    """Varied sampled tokens through gemma3's sliding-window cache (window 4, 12 new tokens)."""
    _, _, _, out = gemma3_sampled
    assert int(out.num_generated) == 12 and np.all(np.asarray(out.lengths_B) == 12)
    assert min(len(set(row)) for row in np.asarray(out.tokens_BxN).tolist()) >= 6  # varied tokens
    err, scale = _full_forward_error(models["gemma3"], out, 7)
    print(f"gemma3 sampled: max |cached - full| = {err:.2e} (max |logit| {scale:.1f})")
    assert scale > 5.0 and err <= 1e-5 * scale


def _hf_greedy(hf, ids, new, eos=EOS, pad=0):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family,prompt_len,new", GREEDY_CASES)
def test_greedy_matches_transformers(folders, greedy_run, family, prompt_len, new):
    rows, out = greedy_run(family, prompt_len, new)
    gap = _top2_gap(out.logits_BxNxV, out.mask_BxN)
    print(f"{family} P={prompt_len}: smallest top-2 logit gap {gap:.3f}")
    assert gap > MIN_MARGIN, f"near-tie (top-2 gap {gap:.1e}): choose another prompt"
    hf = AutoModelForCausalLM.from_pretrained(folders[family], dtype=torch.float32).eval()
    ours, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    for r, ids in enumerate(rows):  # the oracle runs each prompt alone, unpadded
        ref = _hf_greedy(hf, ids, new)
        if EOS in ref:
            ref = ref[:ref.index(EOS) + 1]
        assert lengths[r] == len(ref)
        assert ours[r, :lengths[r]].tolist() == ref
        assert np.all(ours[r, lengths[r]:] == 0)
    assert int(out.num_generated) == lengths.max()


# ---------------------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()  # a required test dependency: missing fails, never skips
    m = so8t_jax.load(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return m, hf


def test_smollm2_greedy_matches_transformers(smollm2):
    m, hf = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    eos_ids = sampling.eos_ids_of(m)
    assert eos_ids == (2,)
    ids = so8t_jax.loading.encode_prompt(m.tokenizer, messages)
    ref = _hf_greedy(hf, ids, 20, eos=list(eos_ids), pad=2)
    assert ref[-1] == 2 and m.tokenizer.decode(ref[:-1]) == "The capital of France is Paris."

    text = sampling.generate(m, [messages], max_new_tokens=20)
    assert text == ["The capital of France is Paris."]
    # token for token, with the same (cached) compiled sampler and left padding that generate() used
    tokens, mask = sampling.left_pad([ids], sampling.bucket_length(len(ids)), pad_id=2)
    assert tokens.shape[1] > len(ids)  # the prompt really is left-padded
    fn = sampling.make_sample_fn(m.config, 20, sampling.GREEDY, eos_ids, 2)
    out = fn(m.params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0))
    n = int(out.lengths_B[0])
    assert np.asarray(out.tokens_BxN)[0, :n].tolist() == ref
    assert int(out.num_generated) == n < 20


def test_generate_batches_strings_and_chats(folders, models):
    """generate() on a left-padded, bucketed batch equals transformers on each prompt alone."""
    m = models["llama"]
    prompts = ["Hello! How are you today?",
               [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 12 plus 30? Let me think step by step."}]]
    texts = sampling.generate(m, prompts, max_new_tokens=8)
    hf = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32).eval()
    for prompt, text in zip(prompts, texts):
        ids = so8t_jax.loading.encode_prompt(m.tokenizer, prompt)
        ref = _hf_greedy(hf, ids, 8)
        ref = ref[:ref.index(EOS)] if EOS in ref else ref
        assert text == m.tokenizer.decode(ref, skip_special_tokens=True)
    assert sampling.as_prompt_list(prompts[1]) == [prompts[1]] and sampling.as_prompt_list("hi") == ["hi"]
    assert sampling.as_prompt_list(prompts) == prompts
    assert sampling.bucket_length(1) == 16 and sampling.bucket_length(16) == 16
    assert sampling.bucket_length(17) == 32


# ---------------------------------------------------------------------------------------------------------
# filters and draws


def _random_logits(rows, vocab, seed, scale=3.0):
    return (scale * np.random.RandomState(seed).randn(rows, vocab)).astype(np.float32)


def _kept(x):
    return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("rows,vocab,scale", [(32, 200, 3.0), (4, 49152, 1.0)])
def test_filters_match_transformers_warpers(rows, vocab, scale):
    logits = _random_logits(rows, vocab, seed=0, scale=scale)
    t = torch.tensor(logits)
    for ours, theirs in [(top_k_filter(logits, 10), TopKLogitsWarper(10)(None, t)),
                         (top_p_filter(logits, 0.8), TopPLogitsWarper(0.8)(None, t)),
                         (top_p_filter(logits, 0.3), TopPLogitsWarper(0.3)(None, t)),
                         (min_p_filter(logits, 0.1), MinPLogitsWarper(0.1)(None, t))]:
        theirs = theirs.numpy()
        assert 1 <= np.isfinite(theirs).sum(-1).min() and np.isfinite(theirs).sum(-1).max() < vocab
        np.testing.assert_array_equal(_kept(ours), np.isfinite(theirs))
        np.testing.assert_array_equal(np.asarray(ours)[_kept(ours)], logits[_kept(ours)])
    # composed, in transformers' order: temperature, top-k, top-p, min-p
    sampler = Sampler(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)
    chain = t
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9),
                   MinPLogitsWarper(0.05)):
        chain = warper(None, chain)
    chain = chain.numpy()
    ours = np.asarray(sampler.filtered_logits(jnp.asarray(logits)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(chain))
    np.testing.assert_allclose(ours[np.isfinite(ours)], chain[np.isfinite(chain)], rtol=1e-6)
    # switched-off filters are the identity; the top token always survives
    for x in (top_k_filter(logits, 0), top_p_filter(logits, 1.0), min_p_filter(logits, 0.0)):
        np.testing.assert_array_equal(np.asarray(x), logits)
    assert np.all(_kept(top_p_filter(logits, 1e-6)).sum(-1) == 1)
    assert np.all(_kept(min_p_filter(logits, 1.0)).sum(-1) == 1)
    # ties at the threshold are kept together: [3, 3, 1] keeps both 3s for top-1 and for any top-p < 1
    tied = jnp.asarray([[3.0, 3.0, 1.0]])
    for x in (top_k_filter(tied, 1), top_p_filter(tied, 0.2), top_p_filter(tied, 0.6)):
        np.testing.assert_array_equal(_kept(x), [[True, True, False]])
    np.testing.assert_array_equal(_kept(top_p_filter(tied, 0.95)), [[True, True, True]])


def _reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """float64 numpy: the distribution each filter should leave, renormalised."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z, axis=-1)[:, -top_k][:, None]
    if top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        order = np.argsort(-zk, axis=-1)
        p = np.exp(zk - zk.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ps = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(ps, -1) - ps < top_p
        nucleus = np.zeros_like(keep)
        np.put_along_axis(nucleus, order, keep_sorted, -1)
        keep &= nucleus
    if min_p > 0.0:
        zk = np.where(keep, z, -np.inf)
        keep &= np.exp(zk - zk.max(-1, keepdims=True)) >= min_p
    p = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    return p / p.sum(-1, keepdims=True), keep


def _draws(sampler, logits_row, n, seed):
    """n draws from one row of logits (the row broadcast to a batch of n, one key)."""
    batch = jnp.broadcast_to(jnp.asarray(logits_row), (n, logits_row.shape[-1]))
    tokens = jax.jit(sampler.__call__)(batch, jax.random.PRNGKey(seed))
    return np.bincount(np.asarray(tokens), minlength=logits_row.shape[-1])


# Bound on an empirical frequency: each count is Binomial(n, p), so |freq - p| has standard deviation
# sqrt(p (1 - p) / n). A 5-sigma bound per token fails by chance with probability < 6e-7 (normal tail),
# so a union over a few hundred tokens stays < 1e-4; the seeds are fixed, so the test is deterministic.
N_DRAWS = 40_000


def _assert_frequencies(counts, probs):
    freq = counts / counts.sum()
    bound = 5 * np.sqrt(probs * (1 - probs) / counts.sum()) + 1e-12
    assert np.all(np.abs(freq - probs) <= bound), np.abs(freq - probs).max()
    return np.abs(freq - probs).max()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.3, 0, 0.7, 0.0), (1.3, 0, 1.0, 0.2),
    (0.9, 12, 0.9, 0.05)])
def test_draws_follow_filtered_softmax(temperature, top_k, top_p, min_p):
    sampler = Sampler(temperature, top_k, top_p, min_p)
    logits = _random_logits(3, 40, seed=7, scale=1.5)
    probs, keep = _reference_probs(logits, temperature, top_k, top_p, min_p)
    if top_k or top_p < 1.0 or min_p > 0.0:
        assert np.all(keep.sum(-1) < 40) and np.all(keep.sum(-1) > 1)  # the filter is doing something
    for r in range(3):
        counts = _draws(sampler, logits[r], N_DRAWS, seed=r)
        assert counts[~keep[r]].sum() == 0  # never a token outside the kept set
        _assert_frequencies(counts, probs[r])


@pytest.mark.parametrize("sampler", [Sampler(1.0, top_k=3), Sampler(1.0, top_p=0.5), Sampler(1.0, min_p=0.3)])
def test_filtered_draws_stay_in_support(sampler):
    """Many draws over many random rows (large vocab, peaked and flat rows): nothing outside the set."""
    logits = np.concatenate([_random_logits(64, 1000, seed=11, scale=s) for s in (0.3, 3.0, 10.0)])
    _, keep = _reference_probs(logits, 1.0, sampler.top_k, sampler.top_p, sampler.min_p)
    fn = jax.jit(jax.vmap(sampler.__call__, in_axes=(None, 0)))
    tokens = np.asarray(fn(jnp.asarray(logits), jax.random.split(jax.random.PRNGKey(3), 32)))  # [32, B]
    rows = np.broadcast_to(np.arange(len(logits)), tokens.shape)
    assert np.all(keep[rows, tokens])


class InverseCdfTest(chex.TestCase):
    """inverse_cdf_draw against a float64 numpy inverse CDF of the same uniforms (an independent path)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_inverse_cdf(self):
        logits = _random_logits(64, 3000, seed=5, scale=4.0)
        logits[::3, ::7] = -np.inf  # filtered entries: probability 0
        u = np.random.RandomState(1).uniform(size=64).astype(np.float32)
        got = np.asarray(self.variant(sampling.inverse_cdf_draw)(jnp.asarray(u), jnp.asarray(logits)))
        chex.assert_shape(got, (64,))
        p64 = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
        cdf = np.cumsum(p64 / p64.sum(-1, keepdims=True), axis=-1)
        want = np.array([np.searchsorted(cdf[r], u[r], side="right") for r in range(64)])
        # equal unless u lies within float32 rounding of a CDF step
        near = np.array([np.min(np.abs(cdf[r] - u[r])) < 1e-5 for r in range(64)])
        np.testing.assert_array_equal(got[~near], want[~near])
        assert near.sum() <= 2 and np.all(np.isfinite(logits[np.arange(64), got]))

    def test_edges_of_the_unit_interval(self):
        logits = jnp.asarray([[-jnp.inf, 0.0, -jnp.inf, 0.0, -jnp.inf]] * 3)
        u = jnp.asarray([0.0, 0.4999, np.nextafter(np.float32(1), np.float32(0))])
        np.testing.assert_array_equal(np.asarray(sampling.inverse_cdf_draw(u, logits)), [1, 1, 3])


def test_greedy_is_argmax():
    logits = _random_logits(16, 300, seed=2)
    np.testing.assert_array_equal(np.asarray(sampling.GREEDY(jnp.asarray(logits), None)), logits.argmax(-1))


def test_sampling_is_reproducible(models):
    m = models["qwen2"]
    _, tokens, mask = _left_padded([9, 9, 5, 3], m.config.vocab_size, seed=4)
    tokens[1] = tokens[0]  # two identical prompts

    def run(seed):
        fn = sampling.make_sample_fn(m.config, 16, Sampler(temperature=1.0, top_k=40), (), 0)
        return np.asarray(fn(m.params, tokens, mask, jax.random.PRNGKey(seed)).tokens_BxN)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    assert (a[0] != a[1]).mean() > 0.5  # rows draw independently, even from the same prompt


# ---------------------------------------------------------------------------------------------------------
# EOS handling


def test_rows_stop_at_their_first_eos(models, gemma3_sampled):
    m = models["gemma3"]
    tokens, mask, key, free_out = gemma3_sampled  # the same key gives the same draws until a row stops
    free, n, pad = np.asarray(free_out.tokens_BxN), 12, 5
    # three EOS ids: row 0's token at step 1, row 1's at step 3, row 2's at step 2; each row must stop at the
    # first occurrence of any of them
    eos_ids = (int(free[0, 1]), int(free[1, 3]), int(free[2, 2]))
    hits = np.isin(free, eos_ids)
    expected_len = hits.argmax(1) + 1
    assert hits.any(1).all() and list(expected_len) != [expected_len[0]] * 3

    out = sampling.make_sample_fn(m.config, n, Sampler(temperature=10.0), eos_ids, pad)(m.params, tokens, mask, key)
    got, got_mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
    np.testing.assert_array_equal(np.asarray(out.lengths_B), expected_len)
    # every row stopped by step 3, so the loop exited early: num_generated is the longest row's count
    assert int(out.num_generated) == expected_len.max() <= 4 < n
    for r, length in enumerate(expected_len):
        np.testing.assert_array_equal(got[r, :length], free[r, :length])  # same tokens up to the stop
        assert got[r, length - 1] in eos_ids
        assert np.all(got[r, length:] == pad)
        np.testing.assert_array_equal(got_mask[r], np.arange(n) < length)
    # sequence views for the GKD step
    p = tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(out.sequence_BxL), np.concatenate([tokens, got], 1))
    np.testing.assert_array_equal(np.asarray(out.sequence_mask_BxL), np.concatenate([mask, got_mask], 1))
    comp = np.asarray(out.completion_mask_BxL)
    assert np.all(comp[:, :p] == 0) and np.array_equal(comp[:, p:], got_mask)


def test_longrope_training_forward_uses_the_samplers_factors(models):
    """LongRoPE (original context 16): prompts of 4 and 3 tokens in a 6-slot bucket, 12 new tokens. The sampler's
    cache holds 18 > 16 positions, so it draws with the long factors although no row gets past position 15; the
    training forward on [prompt, completion] (context_len = P + N, as objective.py passes it) must use the same
    factors, or on-policy samples would come from a rope that is not the one trained."""
    m = models["phi3_longrope"]
    _, tokens, mask = _left_padded([4, 3], m.config.vocab_size, seed=3)
    tokens, mask = np.pad(tokens, ((0, 0), (2, 0))), np.pad(mask, ((0, 0), (2, 0)))  # P = 6
    out = sampling.make_sample_fn(m.config, 12, sampling.GREEDY, (), 0, return_logits=True)(
        m.params, tokens, mask, jax.random.PRNGKey(0))
    assert int(np.asarray(out.sequence_mask_BxL).sum(1).max()) <= 16 < out.sequence_BxL.shape[1]
    ref = np.asarray(out.logits_BxNxV)

    def predicted(context_len):
        logits = model_lib.forward(m.params, m.config, out.sequence_BxL, mask_BxT=out.sequence_mask_BxL,
                                   context_len=context_len).logits
        return np.asarray(logits)[:, 5:17]

    np.testing.assert_allclose(predicted(18), ref, atol=1e-4, rtol=0)
    assert np.abs(predicted(None) - ref).max() > 1e-2  # by the longest row alone: the short factors
