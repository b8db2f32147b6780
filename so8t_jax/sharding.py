"""Every sharding of the project from one table: logical axis names per parameter, and rules onto the mesh.

The mesh has three named axes (MaxText's scheme), sized by parallel.data / parallel.fsdp / parallel.tensor:

    data    the batch's rows (pure data parallelism: params are not split over it)
    fsdp    the batch's rows too, and the params' model-width dim ("embed"): ZeRO-3 / FSDP, each device holds
            1/fsdp of every weight and Adam moment; XLA gathers a layer's weights where they are used
    tensor  heads, kv heads, MLP width and vocabulary (Megatron-style tensor parallelism)

LOGICAL names each dimension of each parameter leaf (the layout documented atop model.py; axis letters in
conventions.py); RULES map a logical name to mesh axes. A leaf without a row in LOGICAL is an error naming
it. The Adam moments take their parameter's sharding (matched by their path in the optimizer state); the
step counter, lr scale and optimizer scalars are replicated. The teacher uses the same table; with
parallel.shard_teacher its width dims are also split over `data` (it is never updated, so nothing is
lost by holding 1/n of it everywhere), else it is split over fsdp / tensor like the student.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

_QKV = ("layers", "embed", "heads", "head_dim")
_KV = ("layers", "embed", "kv_heads", "head_dim")
_NORM = ("layers", "embed")
_MLP_IN = ("layers", "embed", "mlp")
_GATE = ("layers", "blocks", "so8")
# parameter path (a decoder's tree; "student/" is dropped from a TrainState's paths) -> a name per dimension
LOGICAL: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),                        # [V, D]
    "lm_head": ("embed", "vocab"),                      # [D, V]
    "final_norm": ("embed",),                           # [D]
    "so8t_alpha": (),                                   # [] the scheduled gate strength
    "layers/attn_norm": _NORM, "layers/mlp_norm": _NORM,                       # [Y, D]
    "layers/post_attn_norm": _NORM, "layers/post_mlp_norm": _NORM,
    "layers/q": _QKV,                                   # [Y, D, Q, H]
    "layers/k": _KV, "layers/v": _KV,                   # [Y, D, K, H]
    "layers/o": ("layers", "heads", "head_dim", "embed"),                      # [Y, Q, H, D]
    "layers/gate": _MLP_IN, "layers/up": _MLP_IN,       # [Y, D, F]
    "layers/down": ("layers", "mlp", "embed"),          # [Y, F, D]
    "layers/q_bias": ("layers", "heads", "head_dim"),   # [Y, Q, H]
    "layers/k_bias": ("layers", "kv_heads", "head_dim"), "layers/v_bias": ("layers", "kv_heads", "head_dim"),
    "layers/q_norm": ("layers", "head_dim"), "layers/k_norm": ("layers", "head_dim"),  # [Y, H]
    "layers/attn_gate": _GATE, "layers/mlp_gate": _GATE,                      # [Y, Z, 28]
    "safety_head/w": ("embed", "classes"), "safety_head/b": ("classes",),    # [D, 3], [3]
    "verifier/w": ("embed",), "verifier/b": (),                               # [D], []
    "proj": ("embed", "teacher_embed"),                 # [Ds, Dt] the hidden-state projection (TrainState)
}

# logical name -> mesh axes, tried whole, then shorter prefixes, until the product divides the dimension
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",), "blocks": ("fsdp",),
    "vocab": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
    "teacher_embed": ("tensor",), "packed_rows": ("fsdp", "tensor"),
    "layers": (), "head_dim": (), "so8": (), "classes": (), "packed": (),
}


def teacher_rules(rules: dict = RULES, shard_teacher: bool = False) -> dict:
    """The teacher's rules: the student's, with the width dims also over `data` when shard_teacher."""
    if not shard_teacher:
        return rules
    return {**rules, **{k: (*rules[k], "data") for k in ("embed", "blocks", "packed_rows")}}


def replicated_rules(batch_axes: tuple[str, ...] = ("data",)) -> dict:
    """Rules that replicate every parameter and split only the batch (pmap's placement)."""
    return {k: (batch_axes if k == "batch" else ()) for k in RULES}


def logical_axes(path: str, ndim: int | None = None) -> tuple[str, ...]:
    """The logical axes of a parameter path ("layers/q", "student/layers/q", "proj"); ValueError without a row.
    A quantized teacher's matrix (quant.QuantizedWeight: "layers/q/blocks" uint8 [*lead, R, NB, S], "layers/q/codes"
    int32 [*lead]) is split on its file rows R; its leading (layer) axes and the bytes of a block stay whole."""
    key = path.removeprefix("student/")
    if key in LOGICAL:
        return LOGICAL[key]
    parent, _, leaf = key.rpartition("/")
    if parent in LOGICAL and leaf in ("blocks", "codes") and ndim is not None:
        tail = ("packed_rows", "packed", "packed") if leaf == "blocks" else ()
        return ("layers",) * (ndim - len(tail)) + tail
    raise ValueError(f"parameter {path!r} has no logical axes in so8t_jax/sharding.py LOGICAL: add a row "
                     f"naming each of its dimensions")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _check_rank(path: str, names: tuple, shape) -> None:
    if len(names) != len(shape):
        raise ValueError(f"parameter {path!r} has shape {tuple(shape)} but LOGICAL names {len(names)} dims {names}")


def logical_specs(params) -> dict:
    """The param tree with each leaf replaced by a PartitionSpec of its logical axis names."""
    def spec(path, x):
        names = logical_axes(_path_str(path), np.ndim(x))
        _check_rank(_path_str(path), names, np.shape(x))
        return P(*names)
    return jax.tree_util.tree_map_with_path(spec, params)


def mesh_spec(names: tuple[str, ...], shape, mesh: Mesh, rules: dict = RULES) -> P:
    """Logical names -> the PartitionSpec on `mesh` (full length: one entry per dim). Mesh axes of size 1 or
    absent from the mesh are dropped, and no mesh axis is used twice. A dimension that its mesh axes do not
    divide falls back to a shorter prefix of them, then to replicated on that dim (e.g. 3 kv heads over
    tensor = 2, or 3 SO(8) blocks over fsdp = 8): still correct, it only saves less memory."""
    sizes, used, out = dict(mesh.shape), set(), []
    for name, dim in zip(names, shape):
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule (so8t_jax/sharding.py RULES)")
        axes = tuple(a for a in rules[name] if sizes.get(a, 1) > 1 and a not in used)
        while axes and dim % math.prod(sizes[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_specs(params, mesh: Mesh, rules: dict = RULES):
    """The param tree with each leaf replaced by its PartitionSpec on `mesh`."""
    def spec(path, x):
        names = logical_axes(_path_str(path), np.ndim(x))
        _check_rank(_path_str(path), names, np.shape(x))
        return mesh_spec(names, np.shape(x), mesh, rules)
    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: Mesh, rules: dict = RULES):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def state_shardings(state, mesh: Mesh, rules: dict = RULES):
    """NamedShardings for a TrainState (or any tree holding params and optimizer state): a leaf whose path ends
    in a parameter's path (params["student"]["layers"]["q"], the optimizer's mu / nu ["student"]["layers"]["q"])
    and has that parameter's shape gets the parameter's sharding; every other leaf (step, lr_scale, Adam's
    count, the plateau scalars) is replicated. The parameters are the leaves under `state.params`."""
    params = {_path_str(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    for k, shape in params.items():
        _check_rank(k, logical_axes(k, len(shape)), shape)
    specs = {k: mesh_spec(logical_axes(k, len(shape)), shape, mesh, rules) for k, shape in params.items()}

    def sharding(path, x):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for i in range(len(names)):
            key = "/".join(names[i:])
            if key in specs and params[key] == np.shape(x):
                return NamedSharding(mesh, specs[key])
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_spec(mesh: Mesh, rules: dict = RULES, accum: bool = False) -> P:
    """A batch leaf's rows ([B, ...], or [A, B, ...] with accumulation) over the batch's mesh axes."""
    axes = tuple(a for a in rules["batch"] if mesh.shape.get(a, 1) > 1)
    rows = None if not axes else axes[0] if len(axes) == 1 else axes
    return P(None, rows) if accum else P(rows)


def batch_sharding(mesh: Mesh, rules: dict = RULES, accum: bool = False) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, rules, accum))


def loader_shardings(mesh: Mesh, rules: dict = RULES):
    """(path, shape) -> NamedSharding: what weights/common.assemble builds each stacked tensor with."""
    return lambda path, shape: NamedSharding(mesh, mesh_spec(logical_axes(path, len(shape)), shape, mesh, rules))


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The config's parallel block. mesh mode: a (data, fsdp, tensor) mesh over every device (-1: the rest);
    shard_teacher also splits the teacher's width over `data`."""
    mode: str = "single"
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    shard_teacher: bool = False

    @classmethod
    def of(cls, block) -> ParallelConfig:
        """From a config's parallel block (a run saved before the mesh axes existed lacks them)."""
        d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        """{"data": .., "fsdp": .., "tensor": ..} for `n_devices`; ValueError naming the keys otherwise."""
        given = {a: int(getattr(self, a)) for a in MESH_AXES}
        keys = " x ".join(f"parallel.{a}" for a in MESH_AXES)
        bad = [a for a, v in given.items() if v < 1 and v != -1]
        if bad or list(given.values()).count(-1) > 1:
            raise ValueError(f"{keys} must be sizes >= 1 with at most one -1 (the rest), got "
                             f"{' x '.join(str(v) for v in given.values())}")
        known = math.prod(v for v in given.values() if v != -1)
        if -1 in given.values():
            if n_devices % known:
                raise ValueError(f"{keys} = {' x '.join(str(v) for v in given.values())}: the -1 axis takes the "
                                 f"rest of the {n_devices} devices, but {known} does not divide {n_devices}")
            given = {a: (n_devices // known if v == -1 else v) for a, v in given.items()}
        if math.prod(given.values()) != n_devices:
            raise ValueError(f"{keys} must multiply to the {n_devices} devices, got "
                             f"{' x '.join(str(v) for v in given.values())} = {math.prod(given.values())}")
        return given

    def mesh(self, devices=None) -> Mesh:
        devices = jax.devices() if devices is None else list(devices)
        sizes = self.axis_sizes(len(devices))
        return Mesh(np.asarray(devices).reshape(*sizes.values()), MESH_AXES)

    def teacher_rules(self) -> dict:
        return teacher_rules(RULES, self.shard_teacher)


def teacher_loader_shardings(parallel: ParallelConfig, devices=None):
    """The teacher's per-tensor shardings for a sharded load in mesh mode; None in the other modes (the teacher
    loads whole and placement.py copies it where it goes)."""
    if parallel.mode != "mesh":
        return None
    return loader_shardings(parallel.mesh(devices), parallel.teacher_rules())
