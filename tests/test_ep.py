"""Expert-parallel dispatch against the single-device MoE and a per-token twin with drops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jmamba.moe import moe_dropless, route
from jmamba.parallel import ep as ep_mod
from jmamba.parallel.ep import capacity_rows, make_ep_experts_fn

E, K, D, F = 8, 2, 16, 32


def mesh_of(ep):
    return jax.make_mesh((ep,), ("ep",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:ep])


def problem(T, skew: float, seed=0):
    """T global tokens routed top-K over E experts; skew pushes tokens to experts 0 and 1."""
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (T, D))
    logits = jax.random.normal(k[1], (T, E)).at[:, :2].add(skew)
    w, e, _ = route(logits, K, renormalize=True)
    ws = (jax.random.normal(k[2], (E, D, F)) / np.sqrt(D),
          jax.random.normal(k[3], (E, D, F)) / np.sqrt(D),
          jax.random.normal(k[4], (E, F, D)) / np.sqrt(F))
    return x, w, e, ws, jax.random.normal(k[5], (T, D))


def run_ep(ep, x, w, e, *ws, **kw):
    """The EP experts_fn under shard_map: tokens and the experts' E axis split over 'ep'.
    Returns (y_TxD, dropped per rank)."""
    fn = make_ep_experts_fn(E, ep, **kw)

    def body(x, w, e, wg, wu, wd):
        y, dropped = fn(x, w, e, wg, wu, wd, jnp.float32)
        return y, dropped[None]

    spec = P("ep")
    return jax.jit(jax.shard_map(body, mesh=mesh_of(ep), in_specs=(spec,) * 6,
                                 out_specs=(spec, spec)))(x, w, e, *ws)


def value_and_grads(experts_fn, x, w, e, ws, ct):
    """sum(y * ct) and its gradients w.r.t. x, router weights and the three expert weights."""
    def loss(x, w, ws):
        y, dropped = experts_fn(x, w, e, *ws)
        return jnp.sum(y * ct), (y, dropped)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, ws)


def assert_dropless_equals_one_device(x, w, e, ws, ct, ep, **kw):
    """The dropless EP experts (capacity 1.0 per round, plus kw) against the one-device
    MoE: no copy dropped, equal values and gradients."""
    dropless = lambda x, w, e, *ws: moe_dropless(x, w, e, *ws, jnp.float32)
    (_, (y_ref, _)), g_ref = value_and_grads(dropless, x, w, e, ws, ct)
    (_, (y, dropped)), g = value_and_grads(
        functools.partial(run_ep, ep, capacity_factor=1.0, dropless=True, **kw),
        x, w, e, ws, ct)
    np.testing.assert_array_equal(dropped, np.zeros(ep))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ep,skew", [(1, 0.0), (2, 3.0), (4, 0.0), (4, 3.0)])
def test_ep_equals_single_device_values_and_gradients(ep, skew):
    x, w, e, ws, ct = problem(T=32, skew=skew)
    dropless = lambda x, w, e, *ws: moe_dropless(x, w, e, *ws, jnp.float32)
    (_, (y_ref, _)), g_ref = value_and_grads(dropless, x, w, e, ws, ct)
    # capacity_factor=None: R * S rows, dropless whatever the routing.
    (_, (y, dropped)), g = value_and_grads(
        functools.partial(run_ep, ep, capacity_factor=None), x, w, e, ws, ct)
    np.testing.assert_array_equal(dropped, np.zeros(ep))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_second_round_at_its_largest_cap_gives_the_same_bits(monkeypatch):
    """Round 2 runs the smallest pair cap that holds the leftover (a lax.switch); any larger
    cap moves the same rows, so running the largest, with or without the switch, gives
    bitwise the same values and gradients (scripts/ep_repeat.py --round2 relies on it).
    Skew 0.5 at ep=2: the leftover fits the small cap, so the switch picks another one."""
    x, w, e, ws, ct = problem(T=64, skew=0.5, seed=5)
    fn = functools.partial(run_ep, 2, capacity_factor=1.0, dropless=True)
    picked = []
    switch = jax.lax.switch

    def spy(index, branches, *operands):
        picked.append(index)
        return switch(index, branches, *operands)
    monkeypatch.setattr(jax.lax, "switch", spy)
    ref = value_and_grads(fn, x, w, e, ws, ct)
    assert picked  # the second round is traced
    for largest in (lambda i, b, *o: b[-1](*o),  # no switch
                    lambda i, b, *o: switch(jnp.maximum(i, len(b) - 1), b, *o)):
        monkeypatch.setattr(jax.lax, "switch", largest)
        got = value_and_grads(fn, x, w, e, ws, ct)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b)


def tagged_matmuls():
    """(seen, tagged): tagged(tag) is a grouped matmul (lax.ragged_dot) that appends tag to
    seen each time it is traced."""
    from jmamba.kernels.grouped_matmul import grouped_matmul
    seen = []

    def tagged(tag):
        def mm(x, w, sizes):
            seen.append(tag)
            return grouped_matmul(x, w, sizes, impl="xla")
        return mm
    return seen, tagged


@pytest.mark.parametrize("ep", [2, 4])
def test_later_rounds_use_their_own_matmul(ep):
    """Round 1's expert MLP (its gate, up and down matmuls) runs on `matmul`, every later
    round's (the switch's branches; at ep=4 also rounds 3+, two-branch switches) on
    `later_matmul` (on GPUs the Hopper kernels and lax.ragged_dot: ep.LATER_ROUNDS_MATMUL
    says why); the rounds together still equal the one-device MoE."""
    seen, tagged = tagged_matmuls()
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)
    assert_dropless_equals_one_device(x, w, e, ws, ct, ep, matmul=tagged("first"),
                                      later_matmul=tagged("later"), merge_rounds=False)
    # traced in program order: round 1's three matmuls, then three per later branch/round
    assert len(seen) > 3 and len(seen) % 3 == 0
    assert seen == ["first"] * 3 + ["later"] * (len(seen) - 3)


def test_merged_order_interleaves_two_buffers_by_expert():
    g1, g2 = jnp.asarray([2, 0, 3]), jnp.asarray([1, 2, 0])
    idx, pos = map(np.asarray, ep_mod.merged_order(g1, g2, 7, 4))
    # concat rows: buf1 = 0..6 (used 0-4: x0 0-1, x2 2-4), buf2 = 7..10 (x0 7, x1 8-9)
    np.testing.assert_array_equal(idx, [0, 1, 7, 8, 9, 2, 3, 4, 5, 6, 10])
    np.testing.assert_array_equal(idx[pos], np.arange(11))  # pos is idx's inverse


@pytest.mark.parametrize("ep", [2, 4])
def test_merged_rounds_run_on_round_one_matmul(ep, monkeypatch):
    """With merge_rounds, rounds 1 and 2 run their MLP on `matmul` (one MLP a switch branch:
    round 1 alone, or with round 2's rows); only rounds 3+ (ep=4) use `later_matmul`; and
    --ep_merge_rounds reaches the exchange."""
    from jmamba.cli import parse_config
    from jmamba.parallel import setup
    seen, tagged = tagged_matmuls()
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)
    assert_dropless_equals_one_device(x, w, e, ws, ct, ep, matmul=tagged("first"),
                                      later_matmul=tagged("later"), merge_rounds=True)
    n_first = seen.count("first")
    assert n_first >= 6 and n_first % 3 == 0  # round 1 alone + at least one merged branch
    assert seen.count("later") == (0 if ep == 2 else len(seen) - n_first) and (
        ep == 2 or seen.count("later") > 0)
    got = {}
    monkeypatch.setattr(setup, "make_ep_experts_fn", lambda *a, **kw: got.update(kw))
    setup.experts_fn_for(parse_config(["--config", "cpu_demo", "--ep", "2",
                                       "--ep_merge_rounds", "true"]))
    assert got["merge_rounds"] is True
    setup.experts_fn_for(parse_config(["--config", "cpu_demo", "--ep", "2"]))
    assert got["merge_rounds"] is True  # the default
    assert got["recompute_rounds"] is True  # --ep_rounds_grad recompute, the default


@pytest.mark.parametrize("ep,skew", [(2, 4.0), (4, 4.0), (2, 0.5)])
def test_unmerged_rounds_equal_single_device(ep, skew):
    """merge_rounds=False (--ep_merge_rounds false): round 2 as an MLP of its own, under the
    switch; values and gradients equal the one-device MoE. (The default, merged, is
    test_dropless_rounds_equal_single_device.)"""
    x, w, e, ws, ct = problem(T=64, skew=skew, seed=5)
    assert_dropless_equals_one_device(x, w, e, ws, ct, ep, merge_rounds=False)


@pytest.mark.parametrize("ep,skew,impl", [(2, 4.0, "dense"), (4, 4.0, "dense"),
                                          (4, 4.0, "ragged"), (2, 0.5, "dense"),
                                          (2, 4.0, "ragged")])
def test_dropless_rounds_equal_single_device(ep, skew, impl, monkeypatch):
    """Capacity 1.0 per round and skewed routing: copies that do not fit wait for later
    rounds (asserted to be needed), and values and gradients equal the one-device MoE.
    The default merges round 2 into round 1's MLP. Pair cap 32 at ep=2; the largest
    leftover is 32 at skew 4 and 4 at skew 0.5, so the second round runs at pair caps 32
    and 8; at ep=4 (pair cap 8, leftover 24) rounds 3 and 4 run too."""
    if impl == "ragged":
        monkeypatch.setattr(ep_mod, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, w, e, ws, ct = problem(T=64, skew=skew, seed=5)
    one_round = run_ep(ep, x, w, e, *ws, capacity_factor=1.0, impl=impl)[1]
    assert int(np.sum(one_round)) > 0  # one round would drop copies
    assert_dropless_equals_one_device(x, w, e, ws, ct, ep, impl=impl)


@pytest.mark.parametrize("ep,cf,dropless", [(2, 1.0, True), (4, 1.0, True), (2, 1.25, False)])
def test_dense_exchange_backward_equals_its_autodiff_twin(ep, cf, dropless, monkeypatch):
    """The dense exchange runs each direction's backward as the other direction (gathers, no
    scatter-adds); under skew, rounds and drops it gives what plain autodiff gives, bit for
    bit, and leaves out the scatters."""
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)
    f = functools.partial(run_ep, ep, capacity_factor=cf, impl="dense", dropless=dropless)

    def n_scatters():
        def loss(x, w, ws):
            return jnp.sum(f(x, w, e, *ws)[0] * ct)
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws)).count(
            "scatter")

    (v, (y, dropped)), g = value_and_grads(f, x, w, e, ws, ct)
    moves_scatters = n_scatters()
    monkeypatch.setitem(ep_mod.EXCHANGES, "dense", ep_mod.DENSE_AUTODIFF)
    (v2, (y2, dropped2)), g2 = value_and_grads(f, x, w, e, ws, ct)
    assert n_scatters() >= moves_scatters + 4 * 2  # 4 gathers' scatter-adds per round
    assert int(np.sum(dropped)) == int(np.sum(dropped2)) and (dropless or np.sum(dropped) > 0)
    np.testing.assert_array_equal(y, y2)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)


def test_default_capacity_never_drops_balanced_traffic():
    ep, T = 4, 32
    x, w, _, ws, _ = problem(T, skew=0.0)
    # Token t goes to experts t % E and (t + 1) % E: every expert gets T * K / E copies,
    # and every rank receives exactly the S copies it sends.
    e = (jnp.arange(T)[:, None] + jnp.arange(K)) % E
    y, dropped = run_ep(ep, x, w, e, *ws)
    y_ref, _ = moe_dropless(x, w, e, *ws, jnp.float32)
    np.testing.assert_array_equal(dropped, np.zeros(ep))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def with_capacity_reference(x, w, e, ws, ep, capacity):
    """Per-token MoE under the documented drop rule, as plain loops.

    Each receiving rank keeps copies in (local expert, source rank, token) order until its
    `capacity` rows are full. Returns (y, dropped copies per source rank).
    """
    x, w, e = np.asarray(x), np.asarray(w), np.asarray(e)
    wg, wu, wd = map(np.asarray, ws)
    T, X = x.shape[0] // ep, E // ep
    kept = np.zeros(e.shape, bool)
    for owner in range(ep):
        used = 0
        for ge in range(owner * X, (owner + 1) * X):
            for t, k in zip(*np.nonzero(e == ge)):  # row-major: source rank, then token
                kept[t, k] = used < capacity
                used += 1
    y = np.zeros_like(x)
    for t, k in zip(*np.nonzero(kept)):
        g, u = x[t] @ wg[e[t, k]], x[t] @ wu[e[t, k]]
        y[t] += w[t, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e[t, k]])
    return y, (~kept).reshape(ep, T * K).sum(1)


def test_overflow_drops_exactly_and_keeps_the_rest_right():
    ep, T, cf = 4, 64, 1.0
    x, w, e, ws, _ = problem(T, skew=1.0, seed=3)
    y, dropped = run_ep(ep, x, w, e, *ws, capacity_factor=cf, impl="dense")
    capacity = capacity_rows(T // ep * K, cf, ep)
    y_ref, dropped_ref = with_capacity_reference(x, w, e, ws, ep, capacity)
    # Rank 0 (experts 0, 1) overflows inside expert 0: every source loses some copies
    # and keeps some.
    assert ((dropped_ref > 0) & (dropped_ref < T // ep * K)).all()
    np.testing.assert_array_equal(dropped, dropped_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """ragged_all_to_all as its docstring's pseudo-code, from all_gathers (XLA:CPU has no
    ragged-all-to-all). Rows past a sender's send_sizes read as zero, so sizes that
    disagree between sender and receiver show up as wrong values."""
    ops, ins, sends, outs = (jax.lax.all_gather(a, axis_name) for a in
                             (operand, input_offsets, send_sizes, output_offsets))
    R, per = ins.shape[0], ins.shape[1] // ins.shape[0]
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    result = output
    for src in range(R):
        for j in range(per):
            i = me * per + j  # src's slice number for this receiver
            off = rows - outs[src, i]
            inside = (off >= 0) & (off < recv_sizes[src * per + j])
            got = jnp.where((off < sends[src, i])[:, None],
                            ops[src, jnp.clip(ins[src, i] + off, 0, ops.shape[1] - 1)], 0)
            result = jnp.where(inside[:, None], got, result)
    return result


@pytest.mark.parametrize("cf", [None, 0.5])
def test_ragged_offsets_match_dense_under_an_emulated_ragged_all_to_all(cf, monkeypatch):
    ep, T = 4, 64
    x, w, e, ws, ct = problem(T, skew=4.0, seed=3)
    run = lambda impl: value_and_grads(
        functools.partial(run_ep, ep, capacity_factor=cf, impl=impl), x, w, e, ws, ct)
    (_, (y_d, drop_d)), g_d = run("dense")
    monkeypatch.setattr(ep_mod, "ragged_all_to_all", emulated_ragged_all_to_all)
    (_, (y_r, drop_r)), g_r = run("ragged")
    np.testing.assert_array_equal(drop_r, drop_d)
    np.testing.assert_allclose(y_r, y_d, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_expert_split_names_the_fields():
    with pytest.raises(ValueError, match=r"model\.n_experts.*parallel\.ep"):
        make_ep_experts_fn(6, 4)


def test_ep_matmul_flag_reaches_the_experts():
    """--ep_matmul picks the experts' grouped-matmul path at ep > 1: 'kernel' is refused
    on the CPU (no Hopper kernel there), 'xla' runs; the default 'auto' falls back."""
    from jmamba.cli import parse_config
    from jmamba.parallel.setup import experts_fn_for
    x, w, e, ws, _ = problem(T=32, skew=0.0)

    def run(choice):
        fn = experts_fn_for(parse_config(["--config", "cpu_demo", "--ep", "2",
                                          "--n_experts", "8", "--ep_matmul", choice]))

        def body(x, w, e, wg, wu, wd):
            return fn(x, w, e, wg.astype(jnp.bfloat16), wu.astype(jnp.bfloat16),
                      wd.astype(jnp.bfloat16), jnp.bfloat16)[0]
        spec = P("ep")
        return jax.jit(jax.shard_map(body, mesh=mesh_of(2), in_specs=(spec,) * 6,
                                     out_specs=spec))(x, w, e, *ws)

    with pytest.raises(ValueError, match="Hopper kernel cannot take"):
        run("kernel")
    np.testing.assert_array_equal(run("xla"), run("auto"))


def test_later_rounds_xla_flag_picks_their_products(counted_kernels, monkeypatch):
    """--ep_later_rounds_xla: the later rounds' products it names skip the (stand-in)
    kernels, round 1 keeps them; values and gradients are the same whatever it names, and
    a name outside fwd,dx,dw is refused. --ep_merge_rounds runs round 2 on the kernels
    inside round 1's MLP, under shard_map as on GPUs: same values, more kernel calls."""
    from jmamba.cli import parse_config
    from jmamba.parallel.setup import experts_fn_for
    calls = counted_kernels
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)

    def run(later, merge="false", grad="autodiff"):
        calls.clear()
        fn = experts_fn_for(parse_config(["--config", "cpu_demo", "--ep", "2", "--n_experts",
                                          "8", "--ep_capacity_factor", "1.0",
                                          "--ep_later_rounds_xla", later,
                                          "--ep_merge_rounds", merge,
                                          "--ep_rounds_grad", grad]))
        ep_fn = lambda x, w, e, *ws: jax.shard_map(
            lambda *a: (lambda y, d: (y, d[None]))(*fn(*a[:5], a[5], jnp.bfloat16)),
            mesh=mesh_of(2), in_specs=(P("ep"),) * 6, out_specs=(P("ep"), P("ep")))(
            x, w, e, *(v.astype(jnp.bfloat16) for v in ws))
        out = value_and_grads(ep_fn, x, w, e, ws, ct)
        return out, {p: calls.count(p) for p in ("fwd", "dx", "dw")}
    (all_k, n_all), (dx_x, n_dx), (all_x, n_none) = run(""), run("dx"), run("fwd,dx,dw")
    merged, n_merged = run("fwd,dx,dw", merge="true")
    from jmamba.parallel import switch_vjp
    switched, switch = [], switch_vjp.switch
    monkeypatch.setattr(switch_vjp, "switch", lambda *a: switched.append(1) or switch(*a))
    recomputed, n_recomputed = run("fwd,dx,dw", merge="true", grad="recompute")
    assert switched  # --ep_rounds_grad recompute reached the exchange
    assert all(n_merged[p] > n_none[p] for p in n_none), (n_merged, n_none)
    assert all(n_recomputed[p] > n_none[p] for p in n_none), (n_recomputed, n_none)
    assert n_dx["fwd"] == n_all["fwd"] and n_dx["dw"] == n_all["dw"]
    assert 0 < n_none["dx"] == n_dx["dx"] < n_all["dx"]  # round 1's dx only
    assert 0 < n_none["fwd"] < n_all["fwd"] and 0 < n_none["dw"] < n_all["dw"]  # round 1's
    for other in (dx_x, all_x, merged, recomputed):
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(all_k)):
            np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)
    for bad_flag in (["--ep_later_rounds_xla", "dy"], ["--ep_rounds_grad", "recompile"]):
        with pytest.raises(SystemExit) as bad:
            parse_config(["--config", "cpu_demo", "--ep", "2", *bad_flag])
        assert bad.value.code == 2


def residual_bytes(fn, *args) -> int:
    """Bytes fn's VJP keeps from the forward for the backward (its residuals)."""
    jaxpr = jax.make_jaxpr(lambda *a: jax.tree.leaves(jax.vjp(fn, *a)[1]))(*args)
    return sum(a.size * a.dtype.itemsize for a in jaxpr.out_avals)


@pytest.mark.parametrize("ep,merge", [(2, True), (4, True)])
def test_recomputed_rounds_equal_autodiff(ep, merge):
    """--ep_rounds_grad recompute (recompute_rounds): the rounds' switch and conds keep only
    their inputs for the backward and recompute the branch taken. Values and gradients
    equal JAX's autodiff of the same rounds, and the backward keeps fewer bytes (no
    zero-filled residual slot for every branch not taken)."""
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)
    got, returned = {}, {}
    for recompute in (False, True):
        fn = functools.partial(run_ep, ep, capacity_factor=1.0, dropless=True,
                               merge_rounds=merge, recompute_rounds=recompute)
        got[recompute] = value_and_grads(fn, x, w, e, ws, ct)
        returned[recompute] = residual_bytes(
            lambda x, *ws: jnp.sum(fn(x, w, e, *ws)[0] * ct), x, *ws)
    for a, b in zip(jax.tree.leaves(got[True]), jax.tree.leaves(got[False])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert 0 < returned[True] < returned[False], returned


@pytest.mark.parametrize("ep,chunks", [(2, 2), (4, 4)])
def test_chunked_exchange_equals_one_device(ep, chunks):
    """--ep_chunks: each chunk of a rank's tokens is exchanged and computed by itself, with
    dropless rounds per chunk (skewed routing makes later rounds run); values and gradients
    equal the one-device MoE. With drops allowed, each chunk counts its own."""
    x, w, e, ws, ct = problem(T=64, skew=4.0, seed=5)
    assert_dropless_equals_one_device(x, w, e, ws, ct, ep, chunks=chunks)
    y_drop, dropped = run_ep(ep, x, w, e, *ws, capacity_factor=1.0, chunks=chunks)
    assert int(np.sum(dropped)) > 0  # one round per chunk cannot hold the skew
    kept = np.asarray(jnp.sum(y_drop != 0.0))
    assert 0 < kept < y_drop.size
