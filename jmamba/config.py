"""Typed, frozen configs for the model, training and parallel layout, validated in one place."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

MLP_KINDS = ("moe", "dense", "none")
SSM_IMPLS = ("auto", "chunked", "reference", "kernel")
NORM_IMPLS = ("xla", "pallas")
ATTN_IMPLS = ("auto", "cudnn", "xla", "reference")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Mirrors mamba_ssm's MambaConfig (Mamba2 layers) plus the MoE settings."""

    d_model: int = 64
    n_layer: int = 4
    vocab_size: int = 64
    pad_vocab_size_multiple: int = 8
    # Mamba2 mixer (mamba_ssm.modules.mamba2.Mamba2 defaults, smaller headdim/chunk for CPU).
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    ngroups: int = 1
    chunk_size: int = 32
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False
    ssm_impl: str = "auto"  # the Pallas kernel on GPU (where its tiles fit), chunked on CPU
    # The head and loss over chunks of tokens (jmamba/xent.py, linear_token_losses): one
    # chunk's [tokens, V] logits at a time instead of the whole batch's and their gradient
    # (2 x 3.3 GB at moe_1b's 16 x 2048 bf16 tokens). Same values up to summation order.
    # 0 (the default): chunks of about LOSS_CHUNK_TOKENS (model.py) tokens, i.e. the plain
    # head up to that many; 1: the plain head; N: N chunks. On 2 x H200 (docs/benchmarks.md,
    # thirteenth session) 8 chunks of 4096 tokens cut the pp=2 peak 25.35 -> 22.53 GB at no
    # cost, while 8 chunks of 512 tokens cost 4.5% of a small step.
    loss_chunks: int = 0
    # The layer stack as one lax.scan (one compiled layer) or unrolled (MaxText's
    # scan_layers=False: each layer its own compiled code and residual buffers). The scan
    # stacks every layer's residuals into [Y, ...] arrays and reads them back. None (auto,
    # the default): unrolled on one GPU, the scan on every other layout and on the CPU
    # (parallel.setup.scans_layers). On 2 x H200 (docs/benchmarks.md, fourteenth session)
    # moe_1b's one-GPU step took 200.4 ms unrolled (no remat) against 257.9 scanned (full
    # remat), compiling in 36 s against 15; at ep=2 unrolled compiled in 187 s against 45
    # and needed 87.5 GB against 26.7 for 3% less time. False also unrolls 1F1B's stage
    # loops (forward and recompute; not yet measured on a GPU; the residual stash's stages
    # are unrolled either way).
    scan_layers: bool | None = None
    # The norms: the block's residual add + RMSNorm (two a layer) and the mixer's gated
    # RMSNorm, as XLA's fusions or as one Pallas kernel each way (kernels/norm_pallas.py;
    # Triton on GPU, interpret mode on CPU; widths that are not a power of two up to 4096
    # fall back to XLA). Not yet measured on a GPU.
    norm_impl: str = "xla"
    # Block and LM.
    rms_norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    # Channel mixer after each Mamba2 mixer: "moe", "dense" (gated MLP) or "none".
    mlp: str = "moe"
    d_intermediate: int = 128  # dense gated-MLP hidden size
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 64  # expert SwiGLU hidden size F
    renormalize: bool = True
    # Shared experts (DeepSeek-MoE, Qwen3, Nemotron-3): this many SwiGLU experts of hidden
    # d_expert that every token passes through, added to the routed experts' output.
    n_shared_experts: int = 0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router
    # probabilities for top-k selection only (the weights stay the unbiased probabilities),
    # not trained by gradients; after each step it moves by this rate towards the mean load
    # (+rate for experts that got fewer copies than the mean, -rate for more), from the
    # global counts of the step. 0: off (no bias parameter). DeepSeek-V3 used 1e-3.
    router_bias_rate: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    # Hybrid stacks (mamba_ssm's attn_layer_idx / attn_cfg; jmamba/attention.py): these
    # layers run causal grouped-query attention instead of the Mamba2 mixer. Their weights
    # live in the layer's Mamba2 in_proj / out_proj storage (docs/design.md, "Hybrid
    # layers"), so every layer keeps one parameter structure through any layout.
    attn_layer_idx: tuple[int, ...] = ()
    attn_num_heads: int = 0
    attn_num_heads_kv: int = 0  # 0: attn_num_heads (no grouping)
    attn_head_dim: int = 0  # 0: d_model // attn_num_heads
    attn_rotary_dim: int = 0  # rotary on the first dims of each head (Bamba: half of 128)
    attn_rotary_base: float = 10000.0
    attn_impl: str = "auto"  # auto (cuDNN on GPU for bf16), cudnn, xla, reference
    # mamba_ssm's MHA qkv_proj_bias / out_proj_bias (its defaults are True; Bamba's False).
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def attn_heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of the attention layers."""
        Q = self.attn_num_heads
        return Q, self.attn_num_heads_kv or Q, self.attn_head_dim or self.d_model // max(Q, 1)

    @property
    def attn_widths(self) -> tuple[int, int]:
        """(q/k/v projection width A (Q + 2 R), output projection rows Q A)."""
        Q, R, A = self.attn_heads
        return A * (Q + 2 * R), A * Q

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and logging for one run."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 10
    log_dir: str = "runs/default"
    # Embedded data: multi-query associative recall (see jmamba/data.py).
    task: str = "recall"
    n_pairs: int = 8
    # --- issue 7: real data, watching a run, failure handling (jmamba/tokens.py, metrics.py,
    # guard.py) ---
    # Token files "path[:weight],path[:weight]" (see scripts/prepare_data.py); empty: the
    # embedded recall task above.
    data: str = ""
    peak_tflops: float = 0.0  # per device, for MFU; 0 picks it by device kind (flops.py)
    profile_steps: str = ""  # "10:13": a jax.profiler trace of steps 10-12 under log_dir
    progress: str = "auto"  # "bar", "lines", or "auto": a bar when stdout is a terminal
    # How token files are read: "grain" (jmamba/grain_data.py), "numpy" (its twin,
    # jmamba/tokens.py; same batches), or "auto": grain when it is installed.
    loader: str = "auto"
    # Validation (jmamba/evaluate.py): every eval_every steps and at the last, the mean
    # cross-entropy and accuracy over eval_steps fixed batches of eval_data token files,
    # or, when training on the embedded task, of its held-out split. 0: off.
    eval_data: str = ""
    eval_every: int = 100
    eval_steps: int = 2
    # Packed documents: token files whose sidecar names an eos_id (prepare_data.py writes
    # it) are cut into their documents: the Mamba state (SSD and conv1d) restarts after each
    # EOS, and unless loss_across_documents the target after an EOS (the next document's
    # first token) is not scored. False: windows run as one sequence each (fms-fsdp's way).
    documents: bool = True
    loss_across_documents: bool = False
    skip_nonfinite: bool = False  # skip steps with a NaN/Inf loss or gradient, don't stop
    max_skipped_steps: int = 10  # with skip_nonfinite: more bad steps in a row stop the run
    # XLA's deterministic implementations of scatter, GEMMs and convolutions
    # (--xla_gpu_exclude_nondeterministic_ops): repeatable gradients on GPUs, maybe slower.
    deterministic: bool = False
    # --- end issue 7 ---
    # Checkpoints (jmamba/checkpoint.py); empty ckpt_dir: none. A run started on a directory
    # that holds checkpoints resumes from `resume`: "latest" or a step number.
    ckpt_dir: str = ""
    ckpt_every: int = 100
    keep: int = 3
    resume: str = "latest"


PROGRESS = ("auto", "bar", "lines")  # issue 7
LOADERS = ("auto", "grain", "numpy")  # issue 7
PP_SCHEDULES = ("1f1b", "gpipe", "circular")
PP_COMMS = ("pair", "sum")
PP_STASHES = ("inputs", "residuals")
REMATS = ("auto", "none", "full", "full_with_comm", "dots")
EP_DISPATCH = ("auto", "ragged", "dense")
EP_OVERFLOWS = ("rounds", "redo")
EP_MATMULS = ("auto", "kernel", "xla")  # jmamba/kernels/grouped_matmul.py IMPLS
GMM_PRODUCTS = ("fwd", "dx", "dw")  # jmamba/kernels/grouped_matmul.py PRODUCTS


@dataclass(frozen=True)
class ParallelConfig:
    """Layout of the ('pp', 'ep') mesh and the pipeline schedule."""

    pp: int = 1
    ep: int = 1
    microbatches: int = 1
    # 1f1b: each microbatch's backward as soon as it can run (memory bounded by pp, not M);
    # gpipe: all forwards, then autodiff's backward; circular: gpipe with pp_virtual stages
    # per device (smaller bubble, memory grows with M)
    pp_schedule: str = "1f1b"
    pp_virtual: int = 2  # virtual stages per device for the circular schedule
    # Which layers each (virtual) stage holds, in pipeline order: counts "3,5,5,3" or
    # ranges "0-2,3-7,8-12,13-15". Empty: an even split.
    pp_split: str = ""
    # What crosses a stage boundary: "sum" (hidden + residual, in the residual's dtype; the
    # next block adds them first anyway, so it is exact) or the "pair" (one more array)
    pp_comm: str = "sum"
    # What a 1F1B stage keeps between a microbatch's forward and its backward: "inputs"
    # (each layer's input; the backward recomputes every layer, the cost of full remat) or
    # "residuals" (what autodiff saves, unrolled layers: no recompute, ~the no-remat
    # step's activations per microbatch in flight; pipeline_1f1b.py)
    pp_stash: str = "inputs"
    # per-layer rematerialisation: auto (the fastest that fits, setup.remat_choices: with
    # unrolled layers none where XLA's estimate of the compiled step fits the device pool,
    # else full; with scanned layers on a GPU full, measured faster than none there); none;
    # full (all but what crossed the network, i.e. the expert-parallel exchange's results);
    # full_with_comm (those too: least memory); dots (save matmuls)
    remat: str = "auto"
    # Expert parallelism: receive-buffer rows per ep rank = factor * tokens * top_k (>= 1
    # fits balanced traffic). Dropless (the default): copies that do not fit wait for the
    # next exchange round, so every layout computes the one-device function; with
    # ep_dropless false they are dropped and counted. The exchange is ragged_all_to_all
    # ("ragged", GPU only, sends only real rows) or a padded dense all_to_all ("dense", any
    # backend); "auto" is dense, measured faster on H200s at ep=2.
    ep_capacity_factor: float = 1.25
    ep_dropless: bool = True
    ep_dispatch: str = "auto"
    # The grouped matmul of the experts at ep > 1: "auto" (the Hopper kernel where it
    # applies, else lax.ragged_dot), "kernel", or "xla" (lax.ragged_dot, ~4x slower on GPUs).
    ep_matmul: str = "auto"
    # Products (of fwd, dx, dw) of the dropless exchange's later rounds (after the first)
    # that run on lax.ragged_dot even where ep_matmul runs the kernel: with the kernels in
    # a second round, ep=2 gradients differed call to call on GPUs (docs/benchmarks.md,
    # the ep=2 gradient repeats); lax.ragged_dot costs those rounds every local expert's
    # work.
    ep_later_rounds_xla: tuple[str, ...] = ("fwd", "dx", "dw")
    # Round 2's rows join round 1's in one expert MLP on the kernel (one grouped-matmul
    # call per product for both rounds) instead of a second MLP; rounds 3+ as above. Same
    # values; on GPUs it repeats call to call and was the fastest correct ep=2 exchange
    # measured (docs/benchmarks.md, "Eleventh session"; jmamba/parallel/ep.py).
    ep_merge_rounds: bool = True
    # How the gradient passes the exchange rounds' switches: "autodiff" (JAX's: every
    # branch returns the union of all branches' residuals, zero-filled where not its own;
    # ~50 ms a step of copies and zero fills on the ep=2 moe_1b row) or "recompute"
    # (jmamba/parallel/switch_vjp.py: the residuals are the switch's inputs, and the
    # backward recomputes the branch taken; same values; at ep=2 under --remat full the
    # same matmuls and exchanges; without remat one more forward of the branch). The
    # default since the twelfth session: ep=2 moe_1b 375.7 ms against 431.5 ms, peak
    # 29.66 GB against 34.82 (2 x H200, same call; docs/benchmarks.md).
    ep_rounds_grad: str = "recompute"
    # Split each rank's tokens into this many chunks, each exchanged and computed on its
    # own, so that one chunk's all-to-alls can overlap another's expert matmuls (XLA's
    # latency-hiding scheduler decides). Dropless results do not depend on it; with drops
    # each chunk has its own share of the buffer. Must divide train.seq_len.
    ep_chunks: int = 1
    # How a dropless exchange serves copies that do not fit the first round's buffer:
    # "rounds" (the default): more exchange rounds in the layer, picked by a data-dependent
    # switch in every layer's forward and backward (XLA on GPUs copies a switch's index to
    # the host and waits); "redo": every layer runs ONE round at ep_capacity_factor, and a
    # step in which any copy did not fit is computed again, whole, with one round at
    # capacity ep (which never drops): one switch a step. The same values either way;
    # metrics add ep_redone (1 for a step computed twice). Pick a capacity factor that
    # holds the usual routing skew, or most steps run twice. Not yet measured on GPUs.
    ep_overflow: str = "rounds"

    @property
    def virtual(self) -> int:
        return self.pp_virtual if self.pp_schedule == "circular" else 1


# --- issue 7: many hosts (jmamba/distributed.py) ---
@dataclass(frozen=True)
class DistConfig:
    """jax.distributed.initialize arguments; empty/-1 fall back to the environment (SLURM, or
    JMAMBA_COORDINATOR / JMAMBA_NUM_PROCESSES / JMAMBA_PROCESS_ID); none set: one process."""

    coordinator: str = ""  # "host:port" of process 0
    num_processes: int = -1
    process_id: int = -1
    # This many processes on this host, each with pp * ep / N of its devices, started by
    # train.py itself (torchrun's flag; jmamba/launch.py). 1: one process drives them all.
    nproc_per_node: int = 1
# --- end issue 7 ---


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)  # issue 7

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)


def _check(ok: bool, field_name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"config field '{field_name}' = {value!r}: {rule}")


def _check_choice(value, choices: tuple, field_name: str) -> None:
    """Like _check for a field with fixed choices; the error names the closest one."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.3)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _check(False, field_name, f"must be one of {choices}{hint}", value)


def validate_model(m: ModelConfig) -> ModelConfig:
    for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state",
                 "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
        _check(getattr(m, name) > 0, f"model.{name}", "must be a positive integer",
               getattr(m, name))
    _check(m.d_inner % m.headdim == 0, "model.headdim",
           f"must divide d_inner = expand * d_model = {m.d_inner}", m.headdim)
    _check(m.nheads % m.ngroups == 0, "model.ngroups",
           f"must divide the number of heads d_inner / headdim = {m.nheads}", m.ngroups)
    _check(m.d_inner % m.ngroups == 0, "model.ngroups", "must divide d_inner", m.ngroups)
    _check(0 < m.dt_min <= m.dt_max, "model.dt_min", "need 0 < dt_min <= dt_max", m.dt_min)
    _check(m.dt_init_floor > 0, "model.dt_init_floor", "must be > 0", m.dt_init_floor)
    lo, hi = m.A_init_range
    _check(0 < lo <= hi, "model.A_init_range", "need 0 < low <= high", m.A_init_range)
    _check_choice(m.ssm_impl, SSM_IMPLS, "model.ssm_impl")
    _check_choice(m.norm_impl, NORM_IMPLS, "model.norm_impl")
    _check(m.loss_chunks >= 0, "model.loss_chunks", "must be >= 0 (0: chunks of ~4096 tokens)",
           m.loss_chunks)
    _check_choice(m.dtype, DTYPES, "model.dtype")
    _check(m.rms_norm_eps > 0, "model.rms_norm_eps", "must be > 0", m.rms_norm_eps)
    _check_choice(m.mlp, MLP_KINDS, "model.mlp")
    if m.mlp == "dense":
        _check(m.d_intermediate > 0, "model.d_intermediate", "must be > 0 for mlp='dense'",
               m.d_intermediate)
    if m.attn_layer_idx:
        validate_attention(m)
    if m.mlp == "moe":
        _check(m.n_experts > 0, "model.n_experts", "must be > 0 for mlp='moe'", m.n_experts)
        _check(1 <= m.top_k <= m.n_experts, "model.top_k",
               f"must be in [1, n_experts={m.n_experts}]", m.top_k)
        _check(m.d_expert > 0, "model.d_expert", "must be > 0", m.d_expert)
        _check(m.aux_loss_coef >= 0, "model.aux_loss_coef", "must be >= 0", m.aux_loss_coef)
        _check(m.n_shared_experts >= 0, "model.n_shared_experts", "must be >= 0",
               m.n_shared_experts)
        _check(m.router_bias_rate >= 0, "model.router_bias_rate", "must be >= 0",
               m.router_bias_rate)
        _check(m.z_loss_coef >= 0, "model.z_loss_coef", "must be >= 0", m.z_loss_coef)
    else:
        for name in ("n_shared_experts", "router_bias_rate"):
            _check(not getattr(m, name), f"model.{name}",
                   f"applies to mlp='moe' only (mlp is {m.mlp!r}): set it to 0",
                   getattr(m, name))
    return m


def validate_attention(m: ModelConfig) -> None:
    idx = m.attn_layer_idx
    _check(all(0 <= i < m.n_layer for i in idx) and len(set(idx)) == len(idx),
           "model.attn_layer_idx", f"must be distinct layer indices in [0, n_layer={m.n_layer})",
           ",".join(map(str, idx)))
    _check(m.attn_num_heads > 0, "model.attn_num_heads", "must be > 0 with attention layers",
           m.attn_num_heads)
    Q, R, A = m.attn_heads
    _check(R > 0 and Q % R == 0, "model.attn_num_heads_kv", f"must divide attn_num_heads={Q}",
           m.attn_num_heads_kv)
    _check(m.attn_head_dim > 0 or m.d_model % Q == 0, "model.attn_head_dim",
           f"is needed: attn_num_heads={Q} does not divide d_model={m.d_model}",
           m.attn_head_dim)
    W = m.attn_rotary_dim
    _check(0 <= W <= A and W % 2 == 0, "model.attn_rotary_dim",
           f"must be even and in [0, head dim={A}]", W)
    _check(m.attn_rotary_base > 0, "model.attn_rotary_base", "must be > 0", m.attn_rotary_base)
    _check_choice(m.attn_impl, ATTN_IMPLS, "model.attn_impl")
    _check(m.attn_impl != "cudnn" or m.dtype == "bfloat16", "model.attn_impl",
           "'cudnn' needs model.dtype bfloat16 (cuDNN's flash attention is 16-bit); use "
           "'auto'", m.attn_impl)
    in_width = 2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads
    n_in, n_out = m.attn_widths
    _check(n_in <= in_width and n_out <= m.d_inner, "model.attn_num_heads",
           f"gives attention weights ({n_in} q/k/v columns, {n_out} output rows) "
           f"larger than the Mamba2 in_proj/out_proj they are stored in ({in_width} columns, "
           f"{m.d_inner} rows); use fewer heads or a larger expand", Q)


def validate_train(t: TrainConfig, m: ModelConfig) -> TrainConfig:
    for name in ("steps", "batch_size", "seq_len", "log_every"):
        _check(getattr(t, name) > 0, f"train.{name}", "must be a positive integer",
               getattr(t, name))
    _check(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0",
           t.max_skipped_steps)
    _check(0 <= t.warmup_steps <= t.steps, "train.warmup_steps", "must be in [0, steps]",
           t.warmup_steps)
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _check(t.grad_clip > 0, "train.grad_clip", "must be > 0", t.grad_clip)
    _check(t.task in ("recall",), "train.task", "must be 'recall'", t.task)
    _check(t.ckpt_every > 0, "train.ckpt_every", "must be a positive integer", t.ckpt_every)
    _check(t.keep >= 1, "train.keep", "must be >= 1 (checkpoints to keep)", t.keep)
    _check(t.resume == "latest" or t.resume.isdigit(), "train.resume",
           "must be 'latest' or a step number", t.resume)
    # --- issue 7 ---
    _check_choice(t.progress, PROGRESS, "train.progress")
    _check_choice(t.loader, LOADERS, "train.loader")
    _check(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0: by device)",
           t.peak_tflops)
    from jmamba.metrics import parse_profile_steps
    parse_profile_steps(t.profile_steps)
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: no validation)",
           t.eval_every)
    _check(t.eval_steps >= 1, "train.eval_steps", "must be a positive integer", t.eval_steps)
    from jmamba.tokens import parse_data_spec
    if t.eval_data:
        parse_data_spec(t.eval_data)
    if t.data:
        parse_data_spec(t.data)
        return t  # the recall task's limits below do not apply to token files
    # --- end issue 7 ---
    # The recall task needs room for the pairs and at least one query (see data.py).
    _check(t.n_pairs >= 1, "train.n_pairs", "must be >= 1", t.n_pairs)
    _check(t.seq_len >= 4 * t.n_pairs + 2, "train.seq_len",
           f"must be >= 4 * n_pairs + 2 = {4 * t.n_pairs + 2} for the recall task", t.seq_len)
    _check(m.vocab_size >= 4 * t.n_pairs + 2, "model.vocab_size",
           f"must be >= 4 * n_pairs + 2 = {4 * t.n_pairs + 2} for the recall task",
           m.vocab_size)
    return t


def validate(cfg: Config) -> Config:
    """Checks every section; raises ValueError naming the field and the rule it broke."""
    validate_model(cfg.model)
    validate_train(cfg.train, cfg.model)
    validate_parallel(cfg.parallel, cfg.model, cfg.train)
    d, p = cfg.dist, cfg.parallel
    _check(d.nproc_per_node >= 1 and (p.pp * p.ep) % d.nproc_per_node == 0,
           "dist.nproc_per_node", f"must divide pp * ep = {p.pp * p.ep} (each process "
           "takes an equal share of the devices)", d.nproc_per_node)
    _check(d.nproc_per_node == 1 or not (d.coordinator or d.num_processes >= 0
                                         or d.process_id >= 0), "dist.nproc_per_node",
           "starts its processes on this host by itself; drop --coordinator, "
           "--num_processes and --process_id", d.nproc_per_node)
    return cfg


def validate_parallel(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> ParallelConfig:
    _check(p.pp >= 1, "parallel.pp", "must be >= 1", p.pp)
    _check(p.ep >= 1, "parallel.ep", "must be >= 1", p.ep)
    _check(p.microbatches >= 1, "parallel.microbatches", "must be >= 1", p.microbatches)
    _check_choice(p.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    _check_choice(p.pp_comm, PP_COMMS, "parallel.pp_comm")
    _check_choice(p.pp_stash, PP_STASHES, "parallel.pp_stash")
    if p.pp_stash == "residuals":
        _check(p.pp > 1 and p.pp_schedule == "1f1b", "parallel.pp_stash",
               "residuals needs --pp > 1 and --pp_schedule 1f1b", p.pp_stash)
    _check_choice(p.remat, REMATS, "parallel.remat")
    _check_choice(p.ep_dispatch, EP_DISPATCH, "parallel.ep_dispatch")
    _check_choice(p.ep_matmul, EP_MATMULS, "parallel.ep_matmul")
    _check(isinstance(p.ep_later_rounds_xla, tuple)
           and set(p.ep_later_rounds_xla) <= set(GMM_PRODUCTS), "parallel.ep_later_rounds_xla",
           f"must be a comma list of {','.join(GMM_PRODUCTS)} (or empty)",
           p.ep_later_rounds_xla)
    _check(p.ep_capacity_factor > 0, "parallel.ep_capacity_factor", "must be > 0",
           p.ep_capacity_factor)
    if p.pp_schedule == "circular":
        _check(p.pp_virtual >= 1, "parallel.pp_virtual", "must be >= 1", p.pp_virtual)
        _check(p.microbatches % p.pp == 0, "parallel.microbatches",
               f"must be a multiple of pp = {p.pp} for the circular schedule", p.microbatches)
    _check(t.batch_size % (p.microbatches * p.ep) == 0, "train.batch_size",
           f"must split into microbatches * ep = {p.microbatches} * {p.ep} equal parts",
           t.batch_size)
    # XLA crashed compiling cuDNN attention in the expert-parallel program (a segfault in
    # backend compile, 3 of 3 tries: hybrid_demo at (1,2,1), 2 x H200, jax 0.11.2); 'auto'
    # picks xla there (jmamba.parallel.setup.attention_for_layout). docs/status.md.
    _check(not (m.attn_impl == "cudnn" and m.attn_layer_idx and p.ep > 1), "model.attn_impl",
           "'cudnn' crashes XLA's compiler at parallel.ep > 1 (jax 0.11.2); use 'auto' "
           "(xla attention there)", m.attn_impl)
    _check_choice(p.ep_rounds_grad, ("autodiff", "recompute"), "parallel.ep_rounds_grad")
    _check_choice(p.ep_overflow, EP_OVERFLOWS, "parallel.ep_overflow")
    _check(p.ep_overflow == "rounds" or p.ep_dropless, "parallel.ep_overflow",
           "'redo' recomputes a step whose copies overflowed, which only a dropless exchange "
           "does; with parallel.ep_dropless false leave it at 'rounds'", p.ep_overflow)
    _check(p.ep_overflow == "rounds" or (p.ep > 1 and m.mlp == "moe"), "parallel.ep_overflow",
           "'redo' changes the expert-parallel exchange, so it needs parallel.ep > 1 and "
           f"model.mlp = 'moe' (here ep = {p.ep}, mlp = {m.mlp!r}); leave it at 'rounds'",
           p.ep_overflow)
    _check(p.ep_chunks >= 1 and t.seq_len % p.ep_chunks == 0, "parallel.ep_chunks",
           f"must be >= 1 and divide train.seq_len = {t.seq_len}", p.ep_chunks)
    _check(p.ep_chunks == 1 or (p.ep > 1 and m.mlp == "moe"), "parallel.ep_chunks",
           "splits the expert-parallel exchange, so it needs parallel.ep > 1 and "
           f"model.mlp = 'moe' (here ep = {p.ep}, mlp = {m.mlp!r}); leave it at 1",
           p.ep_chunks)
    if m.mlp == "moe":
        _check(m.n_experts % p.ep == 0, "model.n_experts",
               f"must be divisible by parallel.ep = {p.ep} (one copy of each expert)",
               m.n_experts)
    # Stage splits are checked against n_layer by jmamba.parallel.layout.stage_splits.
    from jmamba.parallel.layout import stage_splits
    stage_splits(m.n_layer, p.pp * p.virtual, p.pp_split)
    return p
