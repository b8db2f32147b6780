"""Layer selection (student.select = kl): the scorer against a float64 numpy KL of the explicitly cut model, and
both search paths (exhaustive, greedy) on a tiny model whose answer is known (layers that add nothing)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_hf_model

import so8t_jax
from so8t_jax import build, select
from so8t_jax import model as model_lib
from so8t_jax.defaults import get_config
from so8t_jax.rows import Row


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return so8t_jax.load(make_hf_model("llama", tmp_path_factory.mktemp("sel") / "m", num_hidden_layers=8))


def _batch(m, rows=3, length=10, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, m.config.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded row
    tokens[1, :3] = 0
    return tokens, mask


def _with_identity_layers(m, layers):
    """The model with `layers` adding nothing to the residual stream (o and down zero): dropping them is free."""
    p = dict(m.params, layers=dict(m.params["layers"]))
    for name in ("o", "down"):
        p["layers"][name] = p["layers"][name].at[jnp.asarray(layers)].set(0.0)
    return dataclasses.replace(m, params=p)


def test_score_is_the_kl_of_the_cut_model(teacher):
    tokens, mask = _batch(teacher)
    score = select.make_scorer(teacher.params, teacher.config, [(tokens, mask)])
    kept = (0, 3, 4, 7)
    cut = build.student_from_teacher(teacher, kept, "float32")
    ref = np.asarray(model_lib.forward(teacher.params, teacher.config, jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
                     .logits, np.float64)
    got = np.asarray(model_lib.forward(cut.params, cut.config, jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
                     .logits, np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    want = kl[mask > 0].mean()
    keep = np.zeros(8, bool)
    keep[list(kept)] = True
    assert want > 0.05
    np.testing.assert_allclose(score(keep), want, rtol=1e-4)
    assert score(np.ones(8, bool)) == pytest.approx(0.0, abs=1e-6)
    # with a scored mask: the KL over those tokens only (they still read the others as context)
    scored = mask.copy()
    scored[:, :5] = 0
    score_tail = select.make_scorer(teacher.params, teacher.config, [(tokens, mask, scored)])
    assert score_tail.tokens == int(scored.sum())
    np.testing.assert_allclose(score_tail(keep), kl[scored > 0].mean(), rtol=1e-4)


def test_selection_scores_what_follows_the_preamble_every_row_shares(teacher):
    """selection_scorer: the tokens every row begins with (the chat template's system turn and user-turn
    opening) are context, not scored; each row is scored on `length` tokens after them."""
    from fixtures import build_tokenizer
    m = dataclasses.replace(teacher, _tokenizer=build_tokenizer())
    config = get_config()
    rows = [Row(f"Question {i}: how many legs have {i} cats?", f"{4 * i}") for i in range(1, 5)]
    enc = [list(e.prompt_ids) + list(e.completion_ids)
           for e in build.data.encode_rows(rows, m.tokenizer, 128, 8, chat=True)]
    shared = build.shared_prefix(enc)
    assert shared > 5 and all(q[:shared] == enc[0][:shared] for q in enc) and enc[0][shared] != enc[1][shared]
    score = build.selection_scorer(config, m, rows, 8, 6)
    assert score.tokens == sum(min(len(q) - shared, 6) for q in enc)
    assert build.shared_prefix([[1, 2, 3], [1, 2], [1, 2, 5]]) == 2 and build.shared_prefix([[4], [5]]) == 0


@pytest.mark.parametrize("exhaustive", [True, False])
def test_picks_the_layers_that_matter(teacher, monkeypatch, exhaustive):
    """Five of eight layers add nothing: keeping the other three costs no KL, and both searches find them
    (the greedy one when exhaustive search is switched off)."""
    m = _with_identity_layers(teacher, [0, 2, 3, 5, 6])
    if not exhaustive:
        monkeypatch.setattr(select, "EXHAUSTIVE", 0)
    calls = []
    score = select.make_scorer(m.params, m.config, [_batch(m)])
    kept, kl = select.kl_layers(lambda keep: calls.append(1) or score(keep), 8, 3)
    assert kept == (1, 4, 7) and kl == pytest.approx(0.0, abs=1e-6)
    assert len(calls) == (56 if exhaustive else 8 + 4 + 4 + 4 + 4)  # C(8, 3); greedy: 8, then a beam of 4


def test_exhaustive_is_the_best_subset(teacher):
    score = select.make_scorer(teacher.params, teacher.config, [_batch(teacher, seed=1)])
    kept, kl = select.kl_layers(score, 8, 2)
    every = {}
    for i in range(8):
        for j in range(i + 1, 8):
            keep = np.zeros(8, bool)
            keep[[i, j]] = True
            every[(i, j)] = score(keep)
    assert kept == min(every, key=every.get) and kl == pytest.approx(min(every.values()))


def test_run_config_selects_by_kl_or_evenly(teacher):
    m = _with_identity_layers(teacher, [0, 2, 3, 5, 6])
    c = get_config()
    c.student.layers, c.student.select_rows, c.student.select_len = 3, 4, 12
    rows = [Row("What is 2 plus 3?", "5"), Row("Name a colour.", "Blue.")]
    assert build.kept_layers(c, m, rows) == (1, 4, 7)
    c.student.select = "even"
    assert build.kept_layers(c, m, rows) == (0, 4, 7)
    student = build.make_student(c, m, (1, 4, 7))
    np.testing.assert_array_equal(student.params["layers"]["q"], np.asarray(m.params["layers"]["q"])[[1, 4, 7]])
    assert jax.tree.map(np.shape, student.params)["layers"]["o"][0] == 3
