"""Stage layout: which layers each pipeline stage holds, and the lossless conversion between
the canonical parameter dict (layer i at row i) and the stage-stacked one the pipeline runs.

Stage-stacked parameters:
    layers/<path>  [V_, S, Ymax, ...]  V_ repeats (circular schedule), S = pp stages, Ymax the
                                        most layers any stage holds; padded rows are zeros and
                                        are skipped at run time.
    io/table       [slots, V, D]        slot 0: the embedding (runs on stage 0); last slot: the
                                        output projection (runs on the last stage). With pp > 1
                                        each stage holds one slot; middle stages' slots are
                                        unused zeros (SPMD needs one shape on every device).
    io/scale       [slots, D]           the final RMSNorm scale, in the last slot.
Pipeline-order stage k = r * pp + s runs on device s, repeat r.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _split_error(spec: str, rule: str) -> ValueError:
    return ValueError(f"config field 'parallel.pp_split' = {spec!r}: {rule}")


def stage_splits(n_layer: int, n_stages: int, spec: str = "") -> tuple[tuple[int, int], ...]:
    """Parses a split into [start, stop) layer ranges per stage, in pipeline order.

    spec: "" (even), counts "3,5,5,3", or ranges "0-2,3-7,8-12,13-15" (inclusive).
    """
    if n_stages > n_layer:
        raise ValueError(f"config field 'parallel.pp' (x pp_virtual) gives {n_stages} stages for "
                         f"only {n_layer} layers (model.n_layer): every stage needs a layer; "
                         f"lower parallel.pp or pp_virtual")
    if not spec:
        if n_layer % n_stages:
            raise ValueError(
                f"config field 'parallel.pp': model.n_layer = {n_layer} does not split evenly "
                f"over {n_stages} stages; set parallel.pp_split (e.g. counts like "
                f"'{','.join(str(c) for c in _near_even(n_layer, n_stages))}')")
        per = n_layer // n_stages
        return tuple((k * per, (k + 1) * per) for k in range(n_stages))
    items = [x.strip() for x in spec.split(",")]
    if len(items) != n_stages:
        raise _split_error(spec, f"names {len(items)} stages, but pp x virtual stages = "
                                 f"{n_stages}")
    ranges = []
    try:
        if all("-" in x for x in items):
            for x in items:
                a, b = (int(v) for v in x.split("-"))
                ranges.append((a, b + 1))
        else:
            start = 0
            for x in items:
                ranges.append((start, start + int(x)))
                start += int(x)
    except ValueError:
        raise _split_error(spec, "use counts like '3,5,5,3' or ranges like '0-2,3-7'") from None
    expected = 0
    for k, (a, b) in enumerate(ranges):
        if b <= a:
            raise _split_error(spec, f"stage {k} is empty; every stage needs at least one layer")
        if a != expected:
            what = "overlaps the previous stage" if a < expected else "leaves a gap before it"
            raise _split_error(spec, f"stage {k} starts at layer {a}, which {what}; "
                                     f"stage {k} should start at layer {expected}")
        expected = b
    if expected != n_layer:
        raise _split_error(spec, f"covers layers 0-{expected - 1}, but model.n_layer = "
                                 f"{n_layer}; the stages must cover every layer exactly once")
    return tuple(ranges)


def _near_even(n, k):
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


@dataclasses.dataclass(frozen=True)
class StageLayout:
    n_layer: int
    pp: int
    virtual: int
    splits: tuple[tuple[int, int], ...]
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "StageLayout":
        p = cfg.parallel
        splits = stage_splits(cfg.model.n_layer, p.pp * p.virtual, p.pp_split)
        return cls(cfg.model.n_layer, p.pp, p.virtual, splits, cfg.model.tie_embeddings)

    @property
    def ymax(self) -> int:
        return max(b - a for a, b in self.splits)

    @property
    def n_slots(self) -> int:
        return self.pp if self.pp > 1 else (1 if self.tied else 2)

    @functools.cached_property
    def counts_VxS(self) -> np.ndarray:
        """Layers held by (repeat r, stage s)."""
        return np.array([b - a for a, b in self.splits], np.int32).reshape(self.virtual, self.pp)

    @functools.cached_property
    def index_VxSxY(self) -> np.ndarray:
        """Global layer index at each stage slot; -1 for padding."""
        idx = np.full((self.virtual * self.pp, self.ymax), -1, np.int32)
        for k, (a, b) in enumerate(self.splits):
            idx[k, :b - a] = np.arange(a, b)
        return idx.reshape(self.virtual, self.pp, self.ymax)

    @functools.cached_property
    def contiguous(self) -> bool:
        """Stage slots hold the layers in order with no padding: [V, S, Y] is a reshape of
        the layer axis, so stage <-> canonical moves no data between devices."""
        return bool(np.array_equal(self.index_VxSxY.reshape(-1), np.arange(self.n_layer)))

    @functools.cached_property
    def splits_like_canonical(self) -> bool:
        """Contiguous with one stage per device (V = 1): each device's stage rows are one
        block of the layer axis, so a canonical [L, ...] array split over 'pp' in blocks
        is already each device's share (with V > 1 a device holds V separate blocks)."""
        return self.contiguous and self.virtual == 1


def stage_leaf(leaf, layout: StageLayout):
    """A canonical layer leaf [L, ...] -> its stage-stacked form [V, S, Ymax, ...] (zero
    rows where a stage holds fewer layers). Non-contiguous layouts take each stage's block
    of rows by a static slice: a gather with the stage index table made XLA replicate
    whole arrays when the two sides are split over devices differently."""
    idx = layout.index_VxSxY
    if layout.contiguous:
        return leaf.reshape(idx.shape + leaf.shape[1:])
    Y = layout.ymax
    blocks = [jnp.pad(leaf[a:b], [(0, Y - (b - a))] + [(0, 0)] * (leaf.ndim - 1))
              for a, b in layout.splits]
    return jnp.stack(blocks).reshape(idx.shape + leaf.shape[1:])


def canonical_leaf(leaf, layout: StageLayout):
    """The inverse of stage_leaf: row i is global layer i again."""
    if layout.contiguous:
        return leaf.reshape((-1,) + leaf.shape[3:])
    by_stage = leaf.reshape((-1,) + leaf.shape[2:])  # [V * S, Ymax, ...]
    return jnp.concatenate([by_stage[k, :b - a] for k, (a, b) in enumerate(layout.splits)])


def stage_io(params: dict, layout: StageLayout) -> dict:
    """The stage-stacked 'io' part (embedding table per end stage, final norm scale) of
    canonical params."""
    emb_VxD = params["embed"]["embedding"]
    out_VxD = emb_VxD if layout.tied else params["lm_head"]["kernel"].T
    n = layout.n_slots
    table = jnp.zeros((n,) + emb_VxD.shape, emb_VxD.dtype).at[0].set(emb_VxD).at[n - 1].set(
        out_VxD)
    scale_D = params["norm_f"]["scale"]
    scale = jnp.zeros((n,) + scale_D.shape, scale_D.dtype).at[n - 1].set(scale_D)
    return {"table": table, "scale": scale}


def to_stage(params: dict, layout: StageLayout) -> dict:
    """Canonical {'embed', 'layers', 'norm_f', ['lm_head']} -> stage-stacked {'layers', 'io'}."""
    return {"layers": jax.tree.map(lambda x: stage_leaf(x, layout), params["layers"]),
            "io": stage_io(params, layout)}


def canonical_io(io: dict, layout: StageLayout) -> dict:
    """The canonical non-layer params from the stage-stacked 'io' part."""
    table = io["table"]
    out = {"embed": {"embedding": table[0]}, "norm_f": {"scale": io["scale"][-1]}}
    if not layout.tied:
        out["lm_head"] = {"kernel": table[-1].T}
    return out


def to_canonical(stage_params: dict, layout: StageLayout) -> dict:
    """The inverse of to_stage: row i of every layer leaf is global layer i again."""
    return {**canonical_io(stage_params["io"], layout),
            "layers": jax.tree.map(lambda x: canonical_leaf(x, layout),
                                   stage_params["layers"])}


def tie_gradients(grads: dict, layout: StageLayout) -> dict:
    """With tied embeddings on pp > 1 stages, the first and last stage each hold a copy of the
    shared table (as Megatron does); both copies get the sum of both ends' gradients, so they
    stay equal under any elementwise optimizer."""
    if not (layout.tied and layout.n_slots > 1):
        return grads
    g = grads["io"]["table"]
    total = g[0] + g[-1]
    g = g.at[0].set(total).at[-1].set(total)
    return {**grads, "io": {**grads["io"], "table": g}}


def unique_sq_norm(grads: dict, layout: StageLayout):
    """Squared global norm counting the tied table once (equal to the canonical model's)."""
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    if layout.tied and layout.n_slots > 1:
        sq = sq - jnp.sum(jnp.square(grads["io"]["table"][-1].astype(jnp.float32)))
    return sq
