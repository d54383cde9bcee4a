"""Grouped matmul y[rows of group e] = x[rows of group e] @ w[e], with a Hopper kernel path.

Glossary: S rows sorted by group, D contraction dim, F output dim, E groups (experts).
Rows [sum(g[:e]), sum(g[:e+1])) belong to group e; rows past sum(g) give zero rows.

Paths (picked at trace time, see `kernel_usable`):
- "xla": `jax.lax.ragged_dot` for the forward pass, dX and dW. It is the reference, and
  what runs on CPU. On GPU XLA lowers it as a dense dot over all groups (~4x slower, see
  FACTS.md), hence the kernel.
- "kernel": Mosaic GPU Pallas kernels shipped with jax (Hopper, sm_90 only):
  forward  y  = ragged_dot_mgpu.ragged_dot(x, w)
  dX       dx = ragged_dot_mgpu.ragged_dot(dy, w, transpose_rhs=True)  (dy @ w[e].T)
  dW       dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy)  (x[g].T @ dy[g])
  Shapes the kernel cannot take: D and F must be multiples of the block sizes (see
  `Blocks`) and x, w must share a 16-bit dtype; otherwise "auto" falls back to "xla" and
  "kernel" raises. S is zero-padded up to a multiple of the row block (the padding rows
  belong to no group). The forward kernel leaves rows past sum(g) unwritten, so they are
  zeroed here to keep lax.ragged_dot's semantics.
Under shard_map the kernels' outputs are typed as the same on every device although they
are per device; both are re-typed here, and each cotangent takes its primal's type
(jmamba/kernels/vma.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jmamba.kernels.vma import cotangent_like, to_varying, varying_axes

IMPLS = ("auto", "kernel", "xla")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes for both kernels (m rows, n output columns, k contraction)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 4  # best of the H200 sweep in docs/benchmarks.md (0.89 of dense)


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def kernel_usable(x_SxD, w_ExDxF, blocks: Blocks = Blocks()) -> bool:
    """Whether forward, dX and dW can all run on the Hopper kernels for these shapes."""
    D, F = w_ExDxF.shape[1:]
    b = blocks
    aligned = (D % b.block_k == 0 and F % b.block_k == 0  # contraction: D (fwd), F (dX)
               and F % (b.block_n * b.grid_block_n) == 0  # fwd output columns
               and D % (b.block_n * b.grid_block_n) == 0  # dX output columns
               and D % b.block_m == 0 and F % b.block_n == 0)  # dW tiles [D, F]
    half = x_SxD.dtype == w_ExDxF.dtype and x_SxD.dtype in (jnp.bfloat16, jnp.float16)
    return _on_hopper() and aligned and half


def default_blocks(x_SxD, w_ExDxF) -> Blocks:
    """The measured-best tiles, with grid_block_n lowered until D and F align (4, 2, 1)."""
    for grid in (4, 2, 1):
        blocks = dataclasses.replace(Blocks(), grid_block_n=grid)
        if kernel_usable(x_SxD, w_ExDxF, blocks):
            return blocks
    return Blocks()


PRODUCTS = ("fwd", "dx", "dw")


def grouped_matmul(x_SxD, w_ExDxF, group_sizes_E, impl: str = "auto",
                   blocks: Blocks | None = None, xla_products: tuple[str, ...] = ()):
    """x_SxD @ w_ExDxF[e] for each group's rows; same contract as `jax.lax.ragged_dot`.

    Differentiable in x and w through a custom VJP whose three products all use `impl`,
    except those named in `xla_products` (of PRODUCTS), which use lax.ragged_dot wherever
    the kernel path is taken. blocks=None picks `default_blocks`.
    """
    if set(xla_products) - set(PRODUCTS):
        raise ValueError(f"xla_products must be among {PRODUCTS}, got {xla_products!r}")
    if blocks is None:
        blocks = default_blocks(x_SxD, w_ExDxF)
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got {impl!r}")
    use_kernel = impl == "kernel" or (impl == "auto" and kernel_usable(x_SxD, w_ExDxF, blocks))
    if impl == "kernel" and not kernel_usable(x_SxD, w_ExDxF, blocks):
        raise ValueError(f"grouped_matmul: the Hopper kernel cannot take x {x_SxD.shape} "
                         f"{x_SxD.dtype}, w {w_ExDxF.shape} {w_ExDxF.dtype} here; "
                         "use impl='auto' or 'xla'")
    if not use_kernel or set(xla_products) == set(PRODUCTS):
        # plain autodiff of lax.ragged_dot: the reference path
        return jax.lax.ragged_dot(x_SxD, w_ExDxF, group_sizes_E.astype(jnp.int32))
    per_product = tuple(None if p in xla_products else blocks for p in PRODUCTS)
    return _gmm(x_SxD, w_ExDxF, group_sizes_E.astype(jnp.int32), per_product)


# blocks3: the (fwd, dx, dw) products' tiles; None selects the XLA path for that product, a
# Blocks value the kernel with those tiles.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x_SxD, w_ExDxF, group_sizes_E, blocks3):
    return _forward(x_SxD, w_ExDxF, group_sizes_E, blocks3[0])


def _gmm_fwd(x_SxD, w_ExDxF, group_sizes_E, blocks3):
    return (_forward(x_SxD, w_ExDxF, group_sizes_E, blocks3[0]),
            (x_SxD, w_ExDxF, group_sizes_E))


def _gmm_bwd(blocks3, residuals, dy_SxF):
    x_SxD, w_ExDxF, group_sizes_E = residuals
    dy_SxF = dy_SxF.astype(x_SxD.dtype)
    dx_SxD = _grad_x(dy_SxF, w_ExDxF, group_sizes_E, blocks3[1])
    dw_ExDxF = _grad_w(x_SxD, dy_SxF, group_sizes_E, blocks3[2])
    # Integer group sizes get no cotangent.
    return (cotangent_like(dx_SxD.astype(x_SxD.dtype), x_SxD),
            cotangent_like(dw_ExDxF.astype(w_ExDxF.dtype), w_ExDxF), None)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _forward(x_SxD, w_ExDxF, group_sizes_E, blocks):
    if blocks is None:
        return jax.lax.ragged_dot(x_SxD, w_ExDxF, group_sizes_E)
    return _kernel_ragged_dot(x_SxD, w_ExDxF, group_sizes_E, blocks, transpose_rhs=False)


def _grad_x(dy_SxF, w_ExDxF, group_sizes_E, blocks):
    """dx[g rows] = dy[g rows] @ w[g].T."""
    if blocks is None:
        return jax.lax.ragged_dot(dy_SxF, jnp.swapaxes(w_ExDxF, 1, 2), group_sizes_E)
    # The kernel reads w[e] as [D, F] and contracts F, so no transposed copy is made.
    return _kernel_ragged_dot(dy_SxF, w_ExDxF, group_sizes_E, blocks, transpose_rhs=True)


def _grad_w(x_SxD, dy_SxF, group_sizes_E, blocks):
    """dw[g] = x[g rows].T @ dy[g rows]; rows outside every group add nothing."""
    if blocks is None:
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(x_SxD, dy_SxF, group_sizes_E, dims)
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    S = x_SxD.shape[0]
    pad = _pad_to(S, max(blocks.block_k, blocks.block_m))
    dw_ExDxF = trd.transposed_ragged_dot(
        _pad_rows(x_SxD, pad), _pad_rows(dy_SxF, pad), group_sizes=group_sizes_E,
        block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
        max_concurrent_steps=blocks.max_concurrent_steps, grid_block_n=blocks.grid_block_n)
    # Mosaic kernels return values typed as the same on every device (kernels/vma.py).
    return to_varying(dw_ExDxF, varying_axes(x_SxD, dy_SxF, group_sizes_E))


def _kernel_ragged_dot(lhs_SxK, rhs, group_sizes_E, blocks, transpose_rhs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    S = lhs_SxK.shape[0]
    pad = _pad_to(S, blocks.block_m)
    out = ragged_dot_mgpu.ragged_dot(
        _pad_rows(lhs_SxK, pad), rhs, group_sizes=group_sizes_E,
        block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
        max_concurrent_steps=blocks.max_concurrent_steps, grid_block_n=blocks.grid_block_n,
        transpose_rhs=transpose_rhs)[:S]
    # Mosaic kernels return values typed as the same on every device (kernels/vma.py).
    out = to_varying(out, varying_axes(lhs_SxK, rhs, group_sizes_E))
    # The kernel writes only rows that belong to a group; the rest is uninitialised memory.
    in_group_S = jnp.arange(S) < jnp.sum(group_sizes_E)
    return jnp.where(in_group_S[:, None], out, jnp.zeros((), out.dtype))


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple - n


def _pad_rows(a, pad: int):
    return a if pad == 0 else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
