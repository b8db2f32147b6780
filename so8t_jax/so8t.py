"""SO(8) rotation gates, the alpha schedule, the safety / verifier heads, and gate folding for export.

Axis letters: so8t_jax/conventions.py (Z: the D / 8 blocks of 8 dims; 28: a block's skew parameters).

Where the gates live in a parameter tree (see `with_gates`):
    layers/attn_gate [Y, Z, 28]   layers/mlp_gate [Y, Z, 28]   so8t_alpha []   (scalar, top level)
Each gate maps a sublayer output y (attention after the o projection, MLP after the down projection) to
    y -> y + sigmoid(alpha) * (blockdiag(R) y - y),   R_k = expm(A_k) in SO(8),   A_k = U_k - U_k^T,
U_k strictly upper triangular holding the block's 28 parameters (row-major, np.triu_indices(8, 1)).
The gate sits BEFORE any post-norm (gemma3's post_attn_norm / post_mlp_norm), right on the o / down
projection's output: it is then a linear map of that projection's output, so `fold_gates` multiplies it into
o and down exactly for every family, and the exported student is a plain model of its family.
`so8t_alpha` is not trained: the model reads it under stop_gradient (its gradient is exactly 0) and the
trainer overwrites it every step with `alpha_schedule(progress)`. Theta = 0 gives R = I: the identity map
whatever alpha is, so a student cut from its teacher starts unchanged.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.conventions import SAFETY_LABELS
from so8t_jax.defaults import DEFAULTS

BLOCK = 8
N_SKEW = BLOCK * (BLOCK - 1) // 2  # 28
_ROWS, _COLS = np.triu_indices(BLOCK, k=1)
_F32 = jnp.float32
HEADS = ("safety_head", "verifier")
HEADS_FILE = "so8t_heads.safetensors"


def skew_from_params(theta_Zx28) -> jax.Array:
    """[..., 28] -> skew-symmetric A [..., 8, 8]: the parameters fill the strict upper triangle U, A = U - U^T."""
    theta = jnp.asarray(theta_Zx28)
    u = jnp.zeros(theta.shape[:-1] + (BLOCK, BLOCK), theta.dtype).at[..., _ROWS, _COLS].set(theta)
    return u - jnp.swapaxes(u, -1, -2)


def rotations(theta_Zx28) -> jax.Array:
    """[Z, 28] (any leading axes) -> R = expm(A) [..., 8, 8] in float32; exactly in SO(8) up to rounding."""
    a = skew_from_params(jnp.asarray(theta_Zx28, _F32))
    flat = a.reshape((-1, BLOCK, BLOCK))
    r = jax.vmap(jax.scipy.linalg.expm)(flat)
    return r.reshape(a.shape)


def _check_width(d: int) -> int:
    if d % BLOCK:
        raise ConfigError(f"SO(8) gates need d_model divisible by {BLOCK}, got {d}")
    return d // BLOCK


def apply_gate(y, theta_Zx28, alpha):
    """y [..., D] -> y + sigmoid(alpha) (blockdiag(R) y - y), computed in float32, returned in y's dtype."""
    z = _check_width(y.shape[-1])
    if theta_Zx28.shape != (z, N_SKEW):
        raise ValueError(f"gate parameters {theta_Zx28.shape} do not fit width {y.shape[-1]}: want ({z}, 28)")
    y32 = y.astype(_F32)
    y_blocks = y32.reshape(y.shape[:-1] + (z, BLOCK))
    ry = jnp.einsum("Zij,...Zj->...Zi", rotations(theta_Zx28), y_blocks,  # i, j: the 8 dims of a block
                    precision=jax.lax.Precision.HIGHEST).reshape(y.shape)
    s = jax.nn.sigmoid(jnp.asarray(alpha, _F32))
    return (y32 + s * (ry - y32)).astype(y.dtype)


def gate_matrix(theta_Zx28, alpha) -> jax.Array:
    """The gate as a [D, D] float32 matrix M acting on column vectors: apply_gate(y) == M @ y (y @ M.T rows)."""
    r = rotations(theta_Zx28)
    z = r.shape[0]
    eye_z = jnp.eye(z, dtype=_F32)
    # blockdiag(R)[(a, i), (b, j)] = delta_ab R_a[i, j]   (a, b: blocks; i, j: the 8 dims of a block)
    block = jnp.einsum("ab,aij->aibj", eye_z, r).reshape(z * BLOCK, z * BLOCK)
    s = jax.nn.sigmoid(jnp.asarray(alpha, _F32))
    eye = jnp.eye(z * BLOCK, dtype=_F32)
    return eye + s * (block - eye)


def init_gates(cfg: ModelConfig, dtype=_F32) -> dict[str, jax.Array]:
    """Zero gates (A = 0, R = I: the identity) for every layer, to merge into params["layers"]."""
    z = _check_width(cfg.d_model)
    shape = (cfg.n_layers, z, N_SKEW)
    return {"attn_gate": jnp.zeros(shape, dtype), "mlp_gate": jnp.zeros(shape, dtype)}


def with_gates(cfg: ModelConfig, params: dict, alpha: float = -5.0, dtype=_F32) -> dict:
    """A copy of params with zero gates in params["layers"] and the scalar params["so8t_alpha"] added."""
    layers = dict(params["layers"], **init_gates(cfg, dtype))
    return dict(params, layers=layers, so8t_alpha=jnp.asarray(alpha, _F32))


def has_gates(params: dict) -> bool:
    layers = params.get("layers", {})
    return "attn_gate" in layers or "mlp_gate" in layers


def alpha_schedule(progress, start=-5.0, mid=-2.0, end=1.6, warm=0.05, ramp_center=0.5, ramp_width=0.1):
    """alpha as a function of training progress p in [0, 1] (clipped), jittable:

        p <= warm:  alpha = start + (mid - start) * p / warm
        p >  warm:  alpha = mid + (end - mid) * (sig(p) - sig(warm)) / (sig(1) - sig(warm)),
                    sig(x) = sigmoid((x - ramp_center) / ramp_width)

    The ramp is the sigmoid mid + (end - mid) sigmoid((p - c) / w) rescaled so it starts at exactly `mid`
    at p = warm (continuous) and reaches exactly `end` at p = 1. Defaults: -5 -> -2 over the first 5 %,
    then a ramp centred at p = 0.5 of width 0.1 to 1.6 (sigmoid(alpha): 0.0067 -> 0.12 -> 0.83).
    Monotone non-decreasing whenever start <= mid <= end.
    """
    p = jnp.clip(jnp.asarray(progress, _F32), 0.0, 1.0)
    linear = start + (mid - start) * p / jnp.maximum(warm, 1e-12)

    def sig(x):
        return jax.nn.sigmoid((x - ramp_center) / ramp_width)
    s0, s1 = sig(jnp.asarray(warm, _F32)), sig(jnp.asarray(1.0, _F32))
    ramp = mid + (end - mid) * (sig(p) - s0) / jnp.maximum(s1 - s0, 1e-12)
    return jnp.where(p <= warm, linear, ramp)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The so8t.* config block: gates on or off and the alpha schedule's constants (see alpha_schedule)."""
    gates: bool = DEFAULTS.so8t.gates
    alpha_start: float = DEFAULTS.so8t.alpha_start
    alpha_mid: float = DEFAULTS.so8t.alpha_mid
    alpha_end: float = DEFAULTS.so8t.alpha_end
    alpha_warm: float = DEFAULTS.so8t.alpha_warm
    alpha_center: float = DEFAULTS.so8t.alpha_center
    alpha_width: float = DEFAULTS.so8t.alpha_width

    def __post_init__(self):
        if not self.alpha_start <= self.alpha_mid <= self.alpha_end:
            raise ValueError("so8t.alpha_start <= so8t.alpha_mid <= so8t.alpha_end is required, got "
                             f"{self.alpha_start}, {self.alpha_mid}, {self.alpha_end}")
        if not 0.0 < self.alpha_warm < 1.0:
            raise ValueError(f"so8t.alpha_warm must be in (0, 1), got {self.alpha_warm}")
        if self.alpha_width <= 0:
            raise ValueError(f"so8t.alpha_width must be positive, got {self.alpha_width}")

    def alpha(self, step, total_steps: int):
        """alpha of optimizer step `step` (0-based) of `total_steps`: progress step / (total - 1), so the first
        step uses alpha_start and the last exactly alpha_end (the value folded at export)."""
        progress = jnp.asarray(step, _F32) / max(total_steps - 1, 1)
        return alpha_schedule(progress, self.alpha_start, self.alpha_mid, self.alpha_end, self.alpha_warm,
                              self.alpha_center, self.alpha_width)


def mean_rotation_angle(theta) -> jax.Array:
    """Mean over blocks (all leading axes) of ||A||_F / sqrt(2), in radians.

    For R = expm(A) with plane angles phi_1..phi_4, ||A||_F^2 = 2 sum phi_i^2, so this is sqrt(sum phi_i^2):
    the geodesic distance of R from I (bi-invariant metric) while every |phi_i| <= pi (beyond that it is the
    length of the path taken, not of the shortest one). Cheap and smooth, unlike eigenvalue angles.
    """
    a = skew_from_params(jnp.asarray(theta, _F32))
    return jnp.mean(jnp.sqrt(jnp.sum(a * a, axis=(-1, -2)) / 2.0))


def fold_gates(cfg: ModelConfig, params: dict, alpha=None) -> dict:
    """params without attn_gate / mlp_gate / so8t_alpha, the gates multiplied into o and down.

    Exact for every family because the gate acts on the projection's output before any post-norm:
    o'[q, h, :] = M o[q, h, :] (o' = o M^T as [Q*H, D] rows) and down' = down M^T. alpha: the scalar to
    fold (default params["so8t_alpha"]). Computed in float32, stored in the weights' dtype.
    """
    if not has_gates(params):
        return params
    _check_width(cfg.d_model)
    alpha = params["so8t_alpha"] if alpha is None else alpha
    layers = dict(params["layers"])
    attn_gate, mlp_gate = layers.pop("attn_gate", None), layers.pop("mlp_gate", None)
    gate_YxDxD = jax.vmap(gate_matrix, in_axes=(0, None))
    hi = jax.lax.Precision.HIGHEST
    if attn_gate is not None:
        o = layers["o"]
        # d: the width M reads (D: the width it writes), so o' = o M^T and down' = down M^T
        layers["o"] = jnp.einsum("YQHd,YDd->YQHD", o.astype(_F32), gate_YxDxD(attn_gate, alpha),
                                 precision=hi).astype(o.dtype)
    if mlp_gate is not None:
        down = layers["down"]
        layers["down"] = jnp.einsum("YFd,YDd->YFD", down.astype(_F32), gate_YxDxD(mlp_gate, alpha),
                                    precision=hi).astype(down.dtype)
    out = {k: v for k, v in params.items() if k != "so8t_alpha"}
    out["layers"] = layers
    return out


def init_heads(d_model: int, key, std: float = 0.02) -> dict:
    """Safety head (3 classes: allow, escalate, deny) and per-token verifier: normal(0, std) w, zero b."""
    k1, k2 = jax.random.split(key)
    return {"safety_head": {"w": std * jax.random.normal(k1, (d_model, 3), _F32), "b": jnp.zeros((3,), _F32)},
            "verifier": {"w": std * jax.random.normal(k2, (d_model,), _F32), "b": jnp.zeros((), _F32)}}


def has_heads(params: dict) -> bool:
    return any(k in params for k in HEADS)


def split_heads(params: dict) -> tuple[dict, dict]:
    """(params without the heads, {"safety_head": ..., "verifier": ...} of those present)."""
    return ({k: v for k, v in params.items() if k not in HEADS}, {k: params[k] for k in HEADS if k in params})


def heads_path(model_path) -> pathlib.Path:
    """Where the heads of a model live: FOLDER/so8t_heads.safetensors for a folder, X.so8t_heads.safetensors
    beside a file X.gguf."""
    p = pathlib.Path(model_path)
    return p.with_name(p.stem + "." + HEADS_FILE) if p.suffix == ".gguf" else p / HEADS_FILE


def save_heads(heads: dict, path) -> pathlib.Path:
    """Write the heads as safetensors in torch.nn.Linear layout (weight [out, in], bias [out]):
    safety_head.weight [3, D] / .bias [3] (classes allow, escalate, deny), verifier.weight [1, D] / .bias [1]
    (confidence = sigmoid). Written to a temporary name and renamed: never half a file."""
    from safetensors.numpy import save_file

    tensors = {}
    if "safety_head" in heads:
        tensors["safety_head.weight"] = np.asarray(heads["safety_head"]["w"], np.float32).T
        tensors["safety_head.bias"] = np.asarray(heads["safety_head"]["b"], np.float32).reshape(3)
    if "verifier" in heads:
        tensors["verifier.weight"] = np.asarray(heads["verifier"]["w"], np.float32).reshape(1, -1)
        tensors["verifier.bias"] = np.asarray(heads["verifier"]["b"], np.float32).reshape(1)
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "so8t_jax heads", "safety_labels": ",".join(SAFETY_LABELS)})
    tmp.chmod(0o644)  # safetensors creates files 0o600
    tmp.replace(path)
    return path


def load_heads(path, d_model: int) -> dict:
    """Read `save_heads`' file back into our layout, checking names and shapes against d_model."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    want = {"safety_head.weight": (3, d_model), "safety_head.bias": (3,), "verifier.weight": (1, d_model),
            "verifier.bias": (1,)}
    for name, x in t.items():
        if name not in want:
            raise ValueError(f"{path}: unexpected tensor {name!r} (expected {sorted(want)})")
        if x.shape != want[name]:
            raise ValueError(f"{path}: {name} has shape {x.shape}, expected {want[name]} for width {d_model}")
    heads = {}
    for head in HEADS:
        names = (f"{head}.weight", f"{head}.bias")
        if any(n in t for n in names):
            if not all(n in t for n in names):
                raise ValueError(f"{path}: {head} needs both {names[0]} and {names[1]}")
            w, b = jnp.asarray(t[names[0]], _F32), jnp.asarray(t[names[1]], _F32)
            heads[head] = {"w": w.T, "b": b} if head == "safety_head" else {"w": w[0], "b": b[0]}
    return heads


def last_valid_index(mask_BxL) -> jax.Array:
    """[B] index of the last True per row (left or right padding alike); L - 1 for an all-False row."""
    n_l = mask_BxL.shape[1]
    return (n_l - 1 - jnp.argmax(jnp.flip(mask_BxL.astype(bool), axis=1), axis=1)).astype(jnp.int32)


def safety_logits(heads: dict, hidden_BxPxD, prompt_mask_BxP) -> jax.Array:
    """[B, 3] float32 logits from the final hidden state of each row's last valid prompt token."""
    idx_B = last_valid_index(prompt_mask_BxP)
    h_BxD = jnp.take_along_axis(hidden_BxPxD, idx_B[:, None, None], axis=1)[:, 0].astype(_F32)
    head = heads["safety_head"]
    return jnp.einsum("BD,Dc->Bc", h_BxD, head["w"].astype(_F32),  # c: the 3 safety classes
                      precision=jax.lax.Precision.HIGHEST) + head["b"].astype(_F32)


def verifier_logits(heads: dict, hidden_BxLxD) -> jax.Array:
    """[B, L] float32 per-token logits of sigmoid(v . h_t + b): confidence the student agrees with its teacher."""
    head = heads["verifier"]
    return jnp.einsum("BLD,D->BL", hidden_BxLxD.astype(_F32), head["w"].astype(_F32),
                      precision=jax.lax.Precision.HIGHEST) + head["b"].astype(_F32)
