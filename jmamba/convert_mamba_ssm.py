"""Weights from and to the PyTorch stack: mamba_ssm's MambaLMHeadModel (Mamba2 layers, with
or without the gated MLP, and hybrid stacks' MHA layers) as safetensors <-> jmamba's
canonical parameters.

Files are read and written by the `safetensors` package (numpy API: memory-mapped, one
tensor at a time). The name mapping is documented in docs/checkpoints.md.

    python -m jmamba.convert_mamba_ssm export <ckpt_dir> <out.safetensors> [--step N]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from jmamba import model
from jmamba.config import ModelConfig

def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} from a safetensors file, 16-bit floats widened to float32; raises
    ValueError naming the file and what is wrong."""
    from safetensors import SafetensorError, safe_open
    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                x = f.get_tensor(name)
                out[name] = x.astype(np.float32) if x.dtype.itemsize == 2 and \
                    x.dtype.kind in "fV" else x
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}): the file is "
                         "truncated, damaged or of another format") from None
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata={str(k): str(v) for k, v in (metadata or {}).items()})


# How a jmamba array becomes the PyTorch one (and back). jmamba's Linear kernels are
# [in, out], torch's weights [out, in]; jmamba's depthwise conv kernel is [K, C] with
# out[t] = sum_k w[k] x[t - (K-1) + k], torch's Conv1d weight [C, 1, K] cross-correlates the
# same way over a K-1 left padding, so w_jax[k, c] = w_torch[c, 0, k].
TO_TORCH = {"same": lambda x: x, "linear": lambda x: x.T, "conv": lambda x: x.T[:, None, :]}
FROM_TORCH = {"same": lambda w: w, "linear": lambda w: w.T, "conv": lambda w: w[:, 0, :].T}

# Block parameters: (path under layers/, name under backbone.layers.{i}., kind, config hint).
LAYER_NAMES = [
    (("norm", "scale"), "norm.weight", "same", "d_model"),
    (("mixer", "in_proj", "kernel"), "mixer.in_proj.weight", "linear",
     "d_model, expand, d_state, ngroups, headdim, attn_layer_idx"),
    (("mixer", "in_proj", "bias"), "mixer.in_proj.bias", "same", "bias"),
    (("mixer", "conv1d_kernel"), "mixer.conv1d.weight", "conv",
     "d_conv, expand, d_state, ngroups"),
    (("mixer", "conv1d_bias"), "mixer.conv1d.bias", "same",
     "conv_bias, expand, d_state, ngroups"),
    (("mixer", "dt_bias"), "mixer.dt_bias", "same", "expand, headdim"),
    (("mixer", "A_log"), "mixer.A_log", "same", "expand, headdim"),
    (("mixer", "D"), "mixer.D", "same", "expand, headdim"),
    (("mixer", "norm", "scale"), "mixer.norm.weight", "same", "expand"),
    (("mixer", "out_proj", "kernel"), "mixer.out_proj.weight", "linear",
     "d_model, expand, attn_layer_idx"),
    (("mixer", "out_proj", "bias"), "mixer.out_proj.bias", "same", "bias"),
    # attention layers' biases (MHA's qkv_proj_bias, out_proj_bias): leaves of their own
    (("attn_in_bias",), "mixer.in_proj.bias", "same", "attn_qkv_bias"),
    (("attn_out_bias",), "mixer.out_proj.bias", "same", "attn_out_bias"),
    (("norm2", "scale"), "norm2.weight", "same", "mlp"),
    (("mlp", "fc1", "kernel"), "mlp.fc1.weight", "linear", "mlp, d_intermediate"),
    (("mlp", "fc1", "bias"), "mlp.fc1.bias", "same", "bias"),
    (("mlp", "fc2", "kernel"), "mlp.fc2.weight", "linear", "mlp, d_intermediate"),
    (("mlp", "fc2", "bias"), "mlp.fc2.bias", "same", "bias"),
    # jmamba's MoE has no mamba_ssm counterpart: torch's [out, in] convention, one tensor per
    # expert in global order.
    (("mlp", "router"), "mlp.router.weight", "linear", "mlp, n_experts"),
    (("mlp", "w_gate"), "mlp.experts.{e}.w_gate.weight", "linear", "n_experts, d_expert"),
    (("mlp", "w_up"), "mlp.experts.{e}.w_up.weight", "linear", "n_experts, d_expert"),
    (("mlp", "w_down"), "mlp.experts.{e}.w_down.weight", "linear", "n_experts, d_expert"),
    (("mlp", "router_bias"), "mlp.router.expert_bias", "same", "router_bias_rate, n_experts"),
    # the shared experts are a GatedMLP: mamba_ssm's names, under mlp.shared_experts
    (("mlp", "shared", "fc1", "kernel"), "mlp.shared_experts.fc1.weight", "linear",
     "n_shared_experts, d_expert"),
    (("mlp", "shared", "fc1", "bias"), "mlp.shared_experts.fc1.bias", "same", "bias"),
    (("mlp", "shared", "fc2", "kernel"), "mlp.shared_experts.fc2.weight", "linear",
     "n_shared_experts, d_expert"),
    (("mlp", "shared", "fc2", "bias"), "mlp.shared_experts.fc2.bias", "same", "bias"),
]
TOP_NAMES = [
    (("embed", "embedding"), "backbone.embedding.weight", "same",
     "vocab_size, pad_vocab_size_multiple, d_model"),
    (("norm_f", "scale"), "backbone.norm_f.weight", "same", "d_model"),
    (("lm_head", "kernel"), "lm_head.weight", "linear", "tie_embeddings"),
]


def _names(tree) -> dict[tuple, object]:
    return {tuple(k.key for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Attention layers (hybrid stacks) are mamba_ssm's MHA: its in_proj (q, k, v stacked) and
# out_proj weights are stored in the front of jmamba's Mamba2 in_proj columns and out_proj
# rows (model.attention_weights; the rest of those rows has no tensor), its biases in the
# attn_in_bias / attn_out_bias leaves (which Mamba layers leave unread).
ATTN_SLICES = {
    ("mixer", "in_proj", "kernel"): lambda n_in, n_out: (slice(None), slice(0, n_in)),
    ("mixer", "out_proj", "kernel"): lambda n_in, n_out: (slice(0, n_out),),
}
ATTN_ONLY = {("attn_in_bias",), ("attn_out_bias",)}
ATTN_HINT = "attn_layer_idx, attn_num_heads, attn_num_heads_kv, attn_head_dim"


def _torch_items(leaves: dict, cfg: ModelConfig):
    """(torch name, jmamba path, index into the jmamba array, kind, hint) for every tensor."""
    rules = {path: (name, kind, hint) for path, name, kind, hint in TOP_NAMES}
    rules.update({("layers",) + path: (name, kind, hint)
                  for path, name, kind, hint in LAYER_NAMES})
    n_in, n_out = cfg.attn_widths
    for path, x in leaves.items():
        if path not in rules:
            raise ValueError(f"parameter '{'/'.join(path)}' has no mamba_ssm name; add it to "
                             f"LAYER_NAMES in jmamba/convert_mamba_ssm.py")
        name, kind, hint = rules[path]
        if path[0] != "layers":
            yield name, path, (), kind, hint
            continue
        for i in range(cfg.n_layer):
            attn = i in cfg.attn_layer_idx
            if path[1:] in ATTN_ONLY:
                if attn:
                    yield f"backbone.layers.{i}.{name}", path, (i,), kind, f"{hint}, {ATTN_HINT}"
            elif attn and path[1] == "mixer":
                if path[1:] in ATTN_SLICES:
                    yield (f"backbone.layers.{i}.{name}", path,
                           (i,) + ATTN_SLICES[path[1:]](n_in, n_out), kind, ATTN_HINT)
            elif "{e}" in name:
                for e in range(x.shape[1]):
                    yield (f"backbone.layers.{i}.{name.format(e=e)}", path, (i, e), kind, hint)
            else:
                yield f"backbone.layers.{i}.{name}", path, (i,), kind, hint


def to_mamba_ssm(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical jmamba params -> {mamba_ssm name: float32 array}. With tied embeddings,
    lm_head.weight is written too (a copy), as mamba_ssm's state_dict lists it."""
    leaves = {p: np.asarray(x) for p, x in _names(params).items()}
    out = {name: np.ascontiguousarray(TO_TORCH[kind](leaves[path][index]))
           for name, path, index, kind, _ in _torch_items(leaves, cfg)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


def from_mamba_ssm(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """{mamba_ssm name: array} -> canonical jmamba params (float32) for `cfg`. Raises
    ValueError naming missing, unused or misshapen tensors and the config fields to check."""
    shapes = _names(jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))
    leaves = {path: np.zeros(s.shape, np.float32) for path, s in shapes.items()}
    used, missing = set(), []
    for name, path, index, kind, hint in _torch_items(shapes, cfg):
        want = TO_TORCH[kind](np.broadcast_to(np.float32(0), shapes[path].shape)[index])
        if name not in tensors:
            missing.append(name)
            continue
        w = tensors[name]
        if tuple(w.shape) != want.shape:
            raise ValueError(f"tensor '{name}' has shape {list(w.shape)}, but this config "
                             f"needs {list(want.shape)}: check model.{hint}")
        leaves[path][index] = FROM_TORCH[kind](np.asarray(w, np.float32))
        used.add(name)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) this config needs are missing, e.g. "
                         f"{missing[:3]}: check model.n_layer, mlp, bias, conv_bias, "
                         f"tie_embeddings, attn_layer_idx, attn_qkv_bias, attn_out_bias")
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["backbone.embedding.weight"]):
            raise ValueError("lm_head.weight differs from backbone.embedding.weight: the "
                             "model is untied; set model.tie_embeddings=False")
        used.add("lm_head.weight")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{len(unused)} tensor(s) this config does not use, e.g. "
                         f"{unused[:3]}: check model.n_layer, mlp, n_experts, bias, "
                         f"attn_layer_idx, attn_qkv_bias, attn_out_bias")
    params: dict = {}
    for path, x in leaves.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return params


def import_safetensors(path: str, cfg: ModelConfig) -> dict:
    """A mamba_ssm safetensors file -> canonical params (pass to parallel.setup.build)."""
    return from_mamba_ssm(read_safetensors(path), cfg)


def export_safetensors(params: dict, cfg: ModelConfig, path: str) -> None:
    """Canonical params -> a safetensors file under mamba_ssm's names (inference or
    fine-tuning elsewhere); the model config goes into the file's metadata."""
    write_safetensors(path, to_mamba_ssm(params, cfg),
                      {"format": "mamba_ssm", "jmamba_model_config": json.dumps(
                          {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jmamba.convert_mamba_ssm")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="a checkpoint's parameters -> safetensors")
    export.add_argument("ckpt_dir")
    export.add_argument("out")
    export.add_argument("--step", type=int, default=None, help="default: the latest")
    args = parser.parse_args(argv)
    from jmamba.checkpoint import load
    saved, cfg, meta = load(args.ckpt_dir, args.step)
    export_safetensors(saved["params"], cfg.model, args.out)
    print(f"wrote {args.out}: parameters of {args.ckpt_dir} step {meta['step']}")


if __name__ == "__main__":
    main()
