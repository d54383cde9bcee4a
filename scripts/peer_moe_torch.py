"""The PyTorch peer of jmamba's one-GPU MoE step (issue 17): mamba_ssm's Mamba2 blocks with a
top-2 SwiGLU mixture of experts on `torch._grouped_mm`, the way torchtitan builds its MoE.

Run on a GPU machine with mamba_ssm's pure-Python source on the path (it is not installed
there and is never committed here; fetch state-spaces/mamba and carry its `mamba_ssm`
folder, e.g. under the git-ignored `.peer/`):

    python3 scripts/peer_moe_torch.py --mamba_src .peer --batch 8 --out $OUT/peer_b8.json

Model (the moe_1b preset's shape): vocab 50277 padded to 50288, tied embedding, d_model 1024,
16 blocks of [fused add + RMSNorm, Mamba2 (headdim 64, d_state 128, chunk 256, expand 2),
fused add + RMSNorm, MoE (16 experts of hidden 1024, softmax router, top-2, renormalised)],
residual in fp32, final add + RMSNorm. Loss: cross-entropy + 0.01 x load-balancing loss +
0.001 x router z-loss (jmamba's defaults). Training: fp32 parameters, bf16 autocast, fused
AdamW, no activation recomputation. Mamba2 runs with use_mem_eff_path=False: the fused path
needs the causal_conv1d CUDA extension, which the GPU machines lack; mamba_ssm's Triton SSD
kernels still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types


def import_mamba_ssm(src: str):
    """mamba_ssm's modules without running its package __init__ (which imports Mamba-1's CUDA
    extension and Mamba-3's optional backends, none needed here)."""
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(os.path.abspath(src), "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    try:
        import huggingface_hub  # noqa: F401  (Mamba2 derives from its mixin)
    except ImportError:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    from mamba_ssm.modules.block import Block
    from mamba_ssm.modules.mamba2 import Mamba2
    from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn
    return Block, Mamba2, RMSNorm, layer_norm_fn


def build(args, Block, Mamba2, RMSNorm, layer_norm_fn):
    import functools

    import torch
    import torch.nn.functional as F
    from torch import nn

    E, K, D, Fh = args.n_experts, args.top_k, args.d_model, args.d_expert

    class MoE(nn.Module):
        """Softmax router, top-k, tokens sorted by expert, three grouped matmuls, combine."""

        def __init__(self, dim):
            super().__init__()
            self.router = nn.Linear(dim, E, bias=False)
            self.w_gate = nn.Parameter(torch.randn(E, dim, Fh) / dim ** 0.5)
            self.w_up = nn.Parameter(torch.randn(E, dim, Fh) / dim ** 0.5)
            self.w_down = nn.Parameter(torch.randn(E, Fh, dim) / Fh ** 0.5)
            self.aux = None

        def forward(self, x):
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            T = x.shape[0]
            logits = F.linear(x, self.router.weight).float()
            probs = logits.softmax(-1)
            w, e = probs.topk(K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            flat = e.reshape(-1)
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=E)
            offs = counts.cumsum(0).to(torch.int32)
            bf = torch.bfloat16
            xs = x.to(bf)[order // K]
            h = torch._grouped_mm(xs, self.w_gate.to(bf), offs=offs)
            u = torch._grouped_mm(xs, self.w_up.to(bf), offs=offs)
            y = torch._grouped_mm(F.silu(h) * u, self.w_down.to(bf), offs=offs)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            out = (y[inverse].view(T, K, -1).float() * w[..., None]).sum(1)
            f = counts.float() / flat.numel()
            self.aux = (E * torch.sum(f * probs.mean(0)),
                        torch.logsumexp(logits, -1).pow(2).mean())
            return out.to(x.dtype).view(shape)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(args.vocab, D)
            norm = functools.partial(RMSNorm, eps=1e-5)
            self.layers = nn.ModuleList([
                Block(D, functools.partial(Mamba2, headdim=64, d_state=128, chunk_size=256,
                                           use_mem_eff_path=False, layer_idx=i),
                      MoE, norm_cls=norm, fused_add_norm=True, residual_in_fp32=True)
                for i in range(args.n_layer)])
            self.norm_f = norm(D)

        def forward(self, ids, targets):
            hidden, residual = self.embedding(ids), None
            for layer in self.layers:
                hidden, residual = layer(hidden, residual)
            hidden = layer_norm_fn(hidden, self.norm_f.weight, None, residual=residual,
                                   prenorm=False, residual_in_fp32=True, eps=1e-5,
                                   is_rms_norm=True)
            logits = F.linear(hidden, self.embedding.weight)  # tied head
            ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
            aux = sum(layer.mlp.aux[0] for layer in self.layers) / len(self.layers)
            z = sum(layer.mlp.aux[1] for layer in self.layers) / len(self.layers)
            return ce + 0.01 * aux + 0.001 * z

    return LM


def check_grouped_mm():
    """torch._grouped_mm against a loop over groups on unequal groups (one empty)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(96, 128, device="cuda", generator=g).bfloat16()
    w = torch.randn(3, 128, 64, device="cuda", generator=g).bfloat16()
    sizes = [40, 0, 56]
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    y = torch._grouped_mm(x, w, offs=offs).float()
    start, ref = 0, []
    for i, n in enumerate(sizes):
        ref.append(x[start:start + n].float() @ w[i].float())
        start += n
    err = (y - torch.cat(ref)).abs().max().item()
    assert err < 0.5, f"torch._grouped_mm differs from the loop by {err}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mamba_src", default=".peer", help="folder holding mamba_ssm/")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50288)
    ap.add_argument("--d_model", type=int, default=1024)
    ap.add_argument("--n_layer", type=int, default=16)
    ap.add_argument("--n_experts", type=int, default=16)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--d_expert", type=int, default=1024)
    ap.add_argument("--out", required=True, help="JSON file for the result")
    args = ap.parse_args()
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    row = {"batch": args.batch, "seq": args.seq}
    try:
        check_grouped_mm()
        LM = build(args, *import_mamba_ssm(args.mamba_src))
        model = LM().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, 50277, (args.batch, args.seq + 1), device="cuda", generator=g)
        inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        times = []
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        row.update(step_ms=round(ms, 1), tokens_per_s=round(args.batch * args.seq / ms * 1e3),
                   peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                   loss=round(loss.item(), 4),
                   params=sum(p.numel() for p in model.parameters()))
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # the table shows what failed, the other rows still run
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    main()
