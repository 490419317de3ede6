"""kernels.moe_mlp: every impl against the `loop` oracle, `loop` against a hand computation,
the grouped-GEMM custom op, and torch.compile (the tests named test_compile_* are the slow
ones: deselect with -k "not compile")."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from medmoe import kernels
from medmoe.kernels import DISPATCHES, moe_mlp

E, H, FF = 4, 16, 24  # H and FF keep strides 16-byte aligned, so CPU takes F.grouped_mm


def make(T, k, dtype, gated=False, bias=False, seed=0):
    """Tokens routed to k distinct experts among the first E-1: expert E-1 never gets a token."""
    g = torch.Generator().manual_seed(seed)

    def param(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dtype).requires_grad_()

    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    idx = torch.rand(T, E - 1, generator=g).argsort(-1)[:, :k]  # like a top-k: k distinct ids
    weight = torch.rand(T, k, generator=g).to(dtype).requires_grad_()
    w = {"w_in": param(E, FF, H), "w_out": param(E, H, FF), "w_gate": param(E, FF, H) if gated else None,
         "b_in": param(E, FF) if bias else None, "b_out": param(E, H) if bias else None}
    return x, idx, weight, w


def run(impl, x, idx, weight, w, act=F.gelu, fn=moe_mlp):
    """Output and gradients w.r.t. x, the combine weights and every given expert tensor."""
    out = fn(x, idx, weight, w["w_in"], w["w_out"], gate_proj=w["w_gate"], up_bias=w["b_in"],
             down_bias=w["b_out"], act=act, dispatch=impl)
    leaves = [x, weight] + [t for t in w.values() if t is not None]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * probe).sum(), leaves)
    return [out, *grads]


def assert_close(got, want, tol):
    """Max error relative to the largest entry, which is what bf16's rounding scales with."""
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.numel():
            err = (a.float() - b.float()).abs().max().item()
            assert err <= tol * max(1.0, b.float().abs().max().item()), err


# bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); paths round at different points
# (e.g. F.linear adds the bias before rounding, grouped after), so allow a few steps.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("T", [0, 1, 3, 64])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "gather"])
def test_impl_matches_loop(impl, dtype, gated, bias, k, T):
    x, idx, weight, w = make(T, k, dtype, gated, bias)
    act = F.silu if gated else F.gelu
    got, want = run(impl, x, idx, weight, w, act), run("loop", x, idx, weight, w, act)
    assert_close(got, want, TOL[dtype])
    unused = [g[E - 1] for g in got[3:]]  # grads of the expert that got no tokens
    assert all((g == 0).all() for g in unused)


@pytest.mark.parametrize("gated", [False, True])
def test_loop_matches_hand_computed(gated):
    x, idx, weight, w = make(3, 2, torch.float64, gated, bias=not gated)
    out = moe_mlp(x, idx, weight, w["w_in"], w["w_out"], gate_proj=w["w_gate"], up_bias=w["b_in"],
                  down_bias=w["b_out"], act=F.silu, dispatch="loop")
    for t in range(3):
        want = torch.zeros(H, dtype=torch.float64)
        for j in range(2):
            e = idx[t, j]
            if gated:
                h = F.silu(w["w_gate"][e] @ x[t]) * (w["w_in"][e] @ x[t])
                y = w["w_out"][e] @ h
            else:
                h = F.silu(w["w_in"][e] @ x[t] + w["b_in"][e])
                y = w["w_out"][e] @ h + w["b_out"][e]
            want += weight[t, j] * y
        torch.testing.assert_close(out[t], want, rtol=1e-12, atol=1e-12)


def test_autocast_computes_in_autocast_dtype():
    x, idx, weight, w = make(5, 2, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [run(impl, x, idx, weight, w) for impl in DISPATCHES]
    assert outs[0][0].dtype == torch.bfloat16
    for out in outs[1:]:
        assert_close(out, outs[0], TOL[torch.bfloat16])


def test_auto_choice(monkeypatch):
    x = torch.zeros(1, H)
    assert kernels.choose_dispatch(x, kernels.EAGER_GATHER_MAX_ROWS) == "gather"  # eager: one decoded token
    assert kernels.choose_dispatch(x, kernels.EAGER_GATHER_MAX_ROWS + 1) == "grouped"
    assert kernels.choose_dispatch(x, 1, needs_grad=True) == "grouped"  # training never takes gather
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as while dynamo traces
    assert kernels.choose_dispatch(x, kernels.GATHER_MAX_ROWS) == "gather"
    assert kernels.choose_dispatch(x, kernels.GATHER_MAX_ROWS + 1) == "grouped"


def test_unknown_impl_raises():
    x, idx, weight, w = make(2, 1, torch.float32)
    with pytest.raises(ValueError, match=r"loop.*grouped.*gather"):
        moe_mlp(x, idx, weight, w["w_in"], w["w_out"], dispatch="bogus")


# ----------------------------------------------------------------------------- grouped GEMM op


def grouped_case(K):
    """Rows in 4 groups of sizes 3, 0, 4, 3 (an empty one in the middle)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, K, generator=g, requires_grad=True)
    w = torch.randn(4, 8, K, generator=g, requires_grad=True)
    return x, w, torch.tensor([3, 3, 7, 10], dtype=torch.int32)


@pytest.mark.parametrize("K,native", [(16, True), (5, False)])  # 5 floats: unaligned rows
def test_grouped_mm_matches_per_group_mm(K, native):
    x, w, offs = grouped_case(K)
    assert kernels._use_native(x, w.transpose(-2, -1)) == native
    groups = torch.repeat_interleave(torch.arange(4), torch.diff(offs, prepend=offs.new_zeros(1)))
    want = torch.einsum("mk,mnk->mn", x, w[groups])
    got = kernels._grouped_mm(x, w, offs)
    torch.testing.assert_close(got, want)
    # .sum() hands the backward a stride-0 gradient
    got_grads = torch.autograd.grad(got.sum(), (x, w))
    want_grads = torch.autograd.grad(want.sum(), (x, w))
    torch.testing.assert_close(got_grads, want_grads)
    assert (got_grads[1][1] == 0).all()


@pytest.mark.parametrize("K", [16, 5])
def test_grouped_mm_opcheck(K):
    x, w, offs = grouped_case(K)
    torch.library.opcheck(kernels._grouped_mm, (x, w, offs))
    torch.library.opcheck(kernels._grouped_mm_wgrad, (torch.randn(10, 8), x.detach(), offs))


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("impl", ["grouped", "gather"])
def test_compile_fullgraph_dynamic(impl):
    """fullgraph=True (no graph breaks), backward included, and at most two graphs for four
    token counts: the first call is static, the second makes T dynamic, the rest reuse it."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(moe_mlp, fullgraph=True)
    for T in (5, 17, 33, 100):
        x, idx, weight, w = make(T, 2, torch.float32, gated=True, bias=True, seed=T)
        got = run(impl, x, idx, weight, w, F.silu, fn=compiled)
        assert_close(got, run(impl, x, idx, weight, w, F.silu), 1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
