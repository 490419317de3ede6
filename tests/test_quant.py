"""Weight-only int8/int4 quantization: the stored form against hand-checked bounds and a
byte-by-byte int4 layout, the int4 CPU kernel against x rounded as it rounds it, every kernel path
against the float computation on the dequantized weights (the oracle: a quantized layer must
compute what its dequantized float twin computes), quantized checkpoints written tensor by
tensor, and their bad inputs."""

import gc
import json
import os
import weakref

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import medmoe as M
from medmoe import cli, convert, files, kernels

# Quantized layers run their matrix products in bf16 (what the packed CPU kernels are fast in):
# against fp32 on the same dequantized weights, a few bf16 steps (2^-8 relative) of the output scale.
BF16_TOL = 2e-2


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12)).item()


# ----------------------------------------------------------------------------- the stored form


def test_int8_is_per_channel_and_within_half_a_step():
    w = torch.randn(3, 40, 64) * torch.linspace(0.1, 10, 40)[:, None]  # rows of very different ranges
    data, scales = kernels.quantize(w, 8)
    assert data.dtype == torch.int8 and data.shape == w.shape and scales.shape == (3, 40)
    assert data.abs().amax(-1).eq(127).all()  # each row's largest weight maps to +-127
    err = (kernels.dequantize(data, scales) - w).abs()
    assert (err <= scales.float()[..., None] * 0.5 + 1e-6).all()  # half a step of the stored (bf16) scale


@pytest.mark.parametrize("group", [32, 64])
def test_int4_groups_within_half_a_step(group):
    w = torch.randn(2, 80, 128) + torch.linspace(-3, 3, 128)  # groups with offsets: zeros matter
    data, scales = kernels.quantize(w, 4, group)
    assert data.dtype == torch.uint8 and data.shape == (2, 80, 64) and scales.shape == (2, 5, 128 // group, 2, 16)
    q = kernels._unpack_int4(data)
    assert q.max() <= 15 and (q == 0).any() and (q == 15).any()
    per_row = kernels.row_scales(scales.float()).repeat_interleave(group, -2)  # [2, 80, 128, 2]
    step, zero = per_row[..., 0], per_row[..., 1]
    err = (kernels.dequantize(data, scales) - w).abs()
    assert (err <= step * 0.51 + zero.abs() * 2**-8 + 8 * step * 2**-8 + 1e-6).all()


def test_int4_layout_byte_by_byte():
    """Tiles of 16 rows; in block b of 32 inputs, vector j holds 4 bytes of each row i, byte t with
    inputs 32b+4j+t (low nibble) and 32b+16+4j+t (high): cpu_kernels.cpp's layout, spelled out one byte at a time."""
    N, K = 32, 128
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = kernels._pack_int4(q).flatten().tolist()
    i = 0
    for tile in range(N // 16):
        for b in range(K // 32):
            for j in range(4):
                for r in range(16):
                    for t in range(4):
                        row, k = 16 * tile + r, 32 * b + 4 * j + t
                        assert data[i] == int(q[row, k]) | int(q[row, k + 16]) << 4
                        i += 1
    assert torch.equal(kernels._unpack_int4(kernels._pack_int4(q)), q)


@pytest.mark.parametrize("N", [128, 48])
def test_compiled_dequantize_equals_eager(N):
    data, scales = kernels.quantize(torch.randn(3, N, 64), 4, 32)
    assert torch.equal(torch.compile(kernels.dequantize, fullgraph=True)(data, scales), kernels.dequantize(data, scales))


def test_unsupported_int4_shapes_are_value_errors():
    with pytest.raises(ValueError, match="divisible by 64"):
        kernels.quantize(torch.randn(64, 96), 4, 32)
    with pytest.raises(ValueError, match="group size"):
        kernels.quantize(torch.randn(64, 64), 4, 16)
    with pytest.raises(ValueError, match="by 16"):
        kernels.quantize(torch.randn(42, 64), 4, 32)


# ----------------------------------------------------------------------------- kernels

needs_kernels = pytest.mark.skipif(not kernels.has_cpu_kernels(), reason="cpu_kernels.cpp could not be built here")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 8, 200])  # quant_rows for few rows, dequantize + GEMM for many
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_equals_float_linear_on_dequantized_weights(bits, rows, dtype):
    data, scales = kernels.quantize(torch.randn(96, 128), bits, 32)
    bias = torch.randn(96).to(dtype)
    x = torch.randn(2, rows, 128).to(dtype)
    got = kernels.qlinear(x, data, scales, bias)
    want = F.linear(x.double(), kernels.dequantize(data, scales).double(), bias.double())
    assert got.dtype == dtype and got.shape == (2, rows, 96)
    assert rel_err(got, want) < BF16_TOL


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_row_qlinear_on_a_cpu_is_one_quant_rows_call(bits, dtype):
    """A compiled decode step on a CPU runs each quantized product as our kernel, opaque to inductor: the eager answer."""
    torch._dynamo.reset()
    data, scales = kernels.quantize(torch.randn(96, 128), bits, 32)
    bias, x = torch.randn(96).to(dtype), torch.randn(1, 1, 128).to(dtype)
    got, code = run_and_get_code(torch.compile(kernels.qlinear, fullgraph=True, dynamic=False), x, data, scales, bias)
    assert "medmoe.quant_rows" in "".join(code)
    assert torch.equal(got, kernels.qlinear(x, data, scales, bias))


@pytest.mark.parametrize("K", [kernels.INDUCTOR_SUM_CHUNK + 1, 9000])
def test_compiled_long_rows_are_summed_in_pieces_inductor_sums_in_one_go(K):
    """dot_rows sums a row longer than INDUCTOR_SUM_CHUNK in pieces: the same sum, and C++ without the
    cascade helper inductor takes for longer reductions (slower inside a decode step, kernels.py)."""
    torch._dynamo.reset()
    x, w = torch.randn(3, K).bfloat16(), torch.randn(3, 64, K).bfloat16()  # row r times w[r]: the experts' gathered form
    got, code = run_and_get_code(torch.compile(kernels.dot_rows, fullgraph=True, dynamic=False), x, w)
    assert rel_err(got, (x.double().unsqueeze(-2) * w.double()).sum(-1)) < 1e-6
    assert "CascadeSumHelper" not in "\n".join(code)


E, H, FF = 4, 64, 128  # int4 wants input sizes divisible by 64


def quantized_experts(bits, gated, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"w_in": torch.randn(E, FF, H, generator=g) / 8, "w_out": torch.randn(E, H, FF, generator=g) / 10,
         "w_gate": torch.randn(E, FF, H, generator=g) / 8 if gated else None,
         "b_in": torch.randn(E, FF, generator=g) if bias else None, "b_out": torch.randn(E, H, generator=g) if bias else None}
    q = {k: kernels.quantize(v, bits, 32) if k.startswith("w") and v is not None else v for k, v in w.items()}
    float_twin = {k: kernels.dequantize(*v) if isinstance(v, tuple) else v for k, v in q.items()}
    return q, float_twin


def routed(T, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    idx = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    return x, idx, torch.rand(T, k, generator=g)


def moe(x, idx, weight, w, impl, fn=kernels.moe_mlp):
    return fn(x, idx, weight, w["w_in"], w["w_out"], gate_proj=w["w_gate"], up_bias=w["b_in"], down_bias=w["b_out"], act=F.silu,
              dispatch=impl)


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather", "auto"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (5, 1), (64, 2)])
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_every_dispatch_path_runs_quantized_experts(impl, bits, T, k, gated, bias):
    q, float_twin = quantized_experts(bits, gated, bias)
    x, idx, weight = routed(T, k)
    with torch.no_grad():
        assert rel_err(moe(x, idx, weight, q, impl), moe(x.double(), idx, weight.double(), {
            n: None if v is None else v.double() for n, v in float_twin.items()}, "loop")) < BF16_TOL


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather"])
@pytest.mark.parametrize("bits", [8, 4])
def test_compile_fullgraph_quantized_experts(impl, bits):
    torch._dynamo.reset()
    counters.clear()
    q, _ = quantized_experts(bits, gated=True, bias=False)
    compiled = torch.compile(lambda *a: moe(*a, q, impl), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for T, k in ((1, 1), (3, 2)):
            x, idx, weight = routed(T, k, seed=T)
            assert rel_err(compiled(x, idx, weight), moe(x, idx, weight, q, impl)) < 1e-2
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("ids", [[2, 0, 2, 3, 0], [3]])  # rows grouped by expert; one decoded row's fast path
def test_expert_qmm_opcheck(ids):
    data, scales = kernels.quantize(torch.randn(E, FF, H), 8)
    torch.library.opcheck(kernels._expert_qmm, (torch.randn(len(ids), H), data, scales, torch.tensor(ids)))


def x_rounded_as_the_kernels_do(x, qmax=127):
    """x [M, K] rounded to integers with a scale per 32 inputs (amax / qmax), written out in torch."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(blocks * (1 / scale)) * scale).reshape(x.shape)


def kernel_inputs(seed, rows, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 768, generator=g) * 0.05 + torch.linspace(-0.2, 0.2, 768)  # offsets: int4's zero term matters
    x = torch.randn(rows, 768, generator=g) * torch.linspace(0.1, 3, 768)
    x[:, 64:96] = 0  # a block of zeros (its scale is 1, not 0 / 127)
    return w, x.to(dtype)


def check_each_loop(x, data, scales, want):
    """quant_rows in each of its loops this CPU runs, against want up to float rounding; returns the last answer."""
    tol = 1e-5 if x.dtype == torch.float32 else 2**-8
    for loop in range(kernels.cpu_library().best_loop() + 1):
        got = kernels.quant_rows(x, [data], [scales], loop)[0]
        assert got.dtype == x.dtype and got.shape == (x.shape[0], data.shape[0])
        assert rel_err(got, want) < tol, loop
    return got


@needs_kernels
@pytest.mark.parametrize("group", kernels.INT4_GROUPS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_computes_int8_rounded_x_times_the_dequantized_weights(group, rows, dtype):
    """quant_rows rounds x to int8 (a scale per 32 inputs) and multiplies in integers: its answer is that rounded x
    times (q - 8) * scale, plus x itself times the zeros (each group's sum of x), up to float rounding, in each of its
    loops this CPU runs (portable, AVX2, AVX512-VNNI) alike. Against x times the dequantized weights it is off by x's
    rounding only."""
    w, x = kernel_inputs(group + rows, rows, dtype)
    data, scales = kernels.quantize(w, 4, group)
    dequantized = kernels.dequantize(data, scales).double()
    zero = kernels.row_scales(scales.double())[..., 1].repeat_interleave(group, -1)  # [48, 768]
    want = x_rounded_as_the_kernels_do(x).double() @ (dequantized - zero).T + x.double() @ zero.T
    got = check_each_loop(x, data, scales, want)
    assert rel_err(got, x.double() @ dequantized.T) < BF16_TOL


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_computes_int8_rounded_x_times_the_dequantized_weights(rows, dtype):
    """The same for int8 weights (one scale per row, no zeros), x rounded to int16: so closely that against x times
    the dequantized weights it is off by the output's float rounding only."""
    w, x = kernel_inputs(rows, rows, dtype)
    data, scales = kernels.quantize(w, 8)
    dequantized = kernels.dequantize(data, scales).double()
    want = x_rounded_as_the_kernels_do(x, 32767).double() @ dequantized.T
    got = check_each_loop(x, data, scales, want)
    assert rel_err(got, x.double() @ dequantized.T) < (1e-4 if dtype == torch.float32 else 2**-8)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_rows_opcheck(bits):
    (d1, s1), (d2, s2) = (kernels.quantize(torch.randn(n, 128), bits, 32) for n in (48, 16))
    torch.library.opcheck(kernels.quant_rows, (torch.randn(2, 128), [d1, d2], [s1, s2]))


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_weights_in_one_quant_rows_call_equal_one_call_each(bits, dtype):
    """q, k and v (of different sizes) share one call: x is rounded once, and each weight's rows come out
    as they do alone, to the bit."""
    g = torch.Generator().manual_seed(0)
    weights = [kernels.quantize(torch.randn(n, 256, generator=g), bits, 64) for n in (64, 16, 48)]
    x = torch.randn(3, 256, generator=g).to(dtype)
    together = kernels.quant_rows(x, [d for d, _ in weights], [s for _, s in weights])
    assert [y.shape for y in together] == [(3, 64), (3, 16), (3, 48)]
    for (d, s), y in zip(weights, together):
        assert torch.equal(y, kernels.quant_rows(x, [d], [s])[0])
    strided = torch.cat([weights[0][0], weights[0][0]], -1)[:, : weights[0][0].shape[-1]]  # the same weight, not contiguous
    assert not strided.is_contiguous() and torch.equal(kernels.quant_rows(x, [strided], [weights[0][1]])[0], together[0])
    # weights the loop cannot read with this x: another input size, another group size (int4)
    wider = kernels.quantize(torch.randn(16, 512, generator=g), bits, 64)
    with pytest.raises(ValueError, match="quant_rows"):
        kernels.quant_rows(x, [weights[0][0], wider[0]], [weights[0][1], wider[1]])
    if bits == 4:
        coarser = kernels.quantize(torch.randn(16, 256, generator=g), 4, 128)
        with pytest.raises(ValueError, match="groups"):
            kernels.quant_rows(x, [weights[0][0], coarser[0]], [weights[0][1], coarser[1]])


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "false"])  # no such program; a compiler that fails
def test_kernels_that_cannot_be_built_are_a_warning(monkeypatch, tmp_path, cxx):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("MEDMOE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="could not build cpu_kernels.cpp"):
        assert kernels.cpu_library.__wrapped__() is None
    assert os.listdir(tmp_path) == []


# int4 dequantises, int8 runs PyTorch's packed kernel; int8 rows not a multiple of 64 long run it too
@pytest.mark.parametrize("bits, K, built", [(4, 128, False), (8, 128, False), (8, 96, True)])
def test_without_our_kernels_qlinear_dequantises_or_packs(monkeypatch, bits, K, built):
    monkeypatch.setattr(kernels, "has_cpu_kernels", lambda: built)
    data, scales = kernels.quantize(torch.randn(16, K), bits, 32)
    x = torch.randn(1, K)
    want = x.double() @ kernels.dequantize(data, scales).double().T
    assert rel_err(kernels.qlinear(x, data, scales), want) < (1e-6 if bits == 4 else BF16_TOL)  # the packed kernel is bf16


# ----------------------------------------------------------------------------- models and checkpoints

LLM = dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           max_seq_len=512, tie_embeddings=True, eos_ids=[1], **M.ARCHS["llama"])


def tiny_model(moe=True, seed=0):
    torch.manual_seed(seed)
    cfg = M.Config(llm=M.LLMConfig(**LLM), moe=M.MoEConfig(num_experts=4, top_k=1) if moe else None,
                   vision=M.VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4))
    model = M.MedMoE(cfg).eval()
    for p in model.parameters():  # the default init makes near-uniform logits; spread them out
        p.data.normal_(0, 0.1)
    return model


def dequantized_twin(qmodel):
    """The float model holding exactly the weights a quantized model stands for."""
    twin = M.MedMoE(M.Config(**{**qmodel.cfg.__dict__, "quant": None})).eval()
    sd = qmodel.state_dict()
    state = {}
    for name in twin.state_dict():
        if name in sd and sd[name].is_floating_point():
            state[name] = sd[name].float()
        else:  # quantized: a QuantLinear's `weight` + `scales`, or an expert stack's `up_proj` + `up_proj_scales`
            scales = sd[name[: -len("weight")] + "scales"] if name.endswith(".weight") else sd[name + "_scales"]
            state[name] = kernels.dequantize(sd[name], scales)
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_equals_its_dequantized_twin_and_stays_near_float(bits):
    model = tiny_model()
    ids = torch.randint(2, 256, (2, 20))
    with torch.no_grad():
        want_float = model.llm(model.llm.embed(ids))
        counts = M.count_params(model)
        qmodel = M.quantize(model, M.QuantConfig(bits=bits, group_size=32))
        assert qmodel.cfg.llm.tie_embeddings is False
        # the same weights, plus the LM head that was tied to the embedding (medmoe info's numbers)
        head = LLM["vocab_size"] * LLM["hidden_size"]
        assert M.count_params(qmodel) == {**counts, "llm": counts["llm"] + head, "llm_active": counts["llm_active"] + head,
                                          "total": counts["total"] + head}
        assert isinstance(qmodel.llm.lm_head, M.QuantLinear) and isinstance(qmodel.llm.layers[0].ffn.router, torch.nn.Linear)
        assert qmodel.llm.lm_head.weight.dtype == torch.int8  # an int4 model keeps an int8 LM head
        assert qmodel.llm.layers[0].ffn.router.weight.dtype == torch.float32
        assert isinstance(qmodel.projector[0], M.QuantLinear) and isinstance(qmodel.vision.layers[0].ffn.up_proj, torch.nn.Linear)
        got = qmodel.llm(qmodel.llm.embed(ids))
        twin = dequantized_twin(qmodel)
        assert rel_err(got, twin.llm(twin.llm.embed(ids))) < BF16_TOL
        cos = F.cosine_similarity(got.flatten(0, 1).float(), want_float.flatten(0, 1), -1)
        assert cos.min() > (0.999 if bits == 8 else 0.95)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_decoding_is_one_graph_and_matches_eager(bits):
    """Quantized products decode through quant_rows compiled or not: the eager model is the oracle."""
    torch._dynamo.reset()
    model = M.quantize(tiny_model(), M.QuantConfig(bits=bits, group_size=32))
    before = counters["stats"]["unique_graphs"]
    for prompt in ([[5, 6, 7]], [[8, 9, 10, 11, 12, 13]]):
        want = model.generate(prompt, max_new_tokens=10, stop_ids=[])
        assert model.generate(prompt, max_new_tokens=10, stop_ids=[], compile=True) == want
    assert counters["stats"]["unique_graphs"] - before == 1


@pytest.fixture
def float_ckpt(tmp_path):
    model = tiny_model()
    M.save_model(model, tmp_path / "float")
    return tmp_path / "float"


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.mark.parametrize("bits,extra", [(8, []), (4, ["--group-size", "32", "--quantize-vision"])])
def test_convert_quantize_cli_writes_what_quantize_makes(tmp_path, float_ckpt, bits, extra):
    out = tmp_path / "q"
    result = run("convert", out, "--model", float_ckpt, "--quantize", f"int{bits}", *extra)
    assert result.exit_code == 0, result.output
    assert f"int{bits}" in result.output and "GiB on disk" in result.output
    assert os.path.getsize(out / "model.safetensors") < os.path.getsize(float_ckpt / "model.safetensors") / (2.5 if bits == 8 else 4)
    loaded = M.load_model(out)
    assert loaded.cfg.quant == M.QuantConfig(bits=bits, group_size=32 if bits == 4 else 64, vision=bits == 4)
    # the same as quantizing in memory: converting stores exactly what `quantize` makes
    direct = M.quantize(M.load_model(float_ckpt), loaded.cfg.quant)
    for name, t in direct.state_dict().items():  # (the float rest cast to bf16, as convert does when quantizing)
        want = t.to(torch.bfloat16) if t.is_floating_point() and ".router." not in name else t
        assert torch.equal(loaded.state_dict()[name], want), name
    info = run("info", out)
    assert info.exit_code == 0 and f"int{bits}" in info.output and "per token" in info.output


def test_written_file_is_standard_safetensors_with_aligned_weights(tmp_path, float_ckpt):
    run("convert", tmp_path / "q", "--model", float_ckpt, "--quantize", "int8")
    path = tmp_path / "q" / "model.safetensors"
    ours = files.read_safetensors(path)
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(ours)
        for k in ours:
            assert torch.equal(f.get_tensor(k), ours[k])
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    for k, v in ours.items():
        if not v.is_floating_point():
            assert (start + header[k]["data_offsets"][0]) % 64 == 0, k


def test_on_the_fly_quantization_at_load(float_ckpt):
    model = M.load_model(float_ckpt, quant=M.QuantConfig(bits=8))
    assert model.cfg.quant.bits == 8 and model.llm.layers[1].attn.q_proj.weight.dtype == torch.int8


def test_conversion_holds_one_source_tensor_at_a_time(tmp_path):
    """write_converted fetches, quantizes and writes each tensor before fetching the next."""
    model = tiny_model()
    tensors = {k: v.to("meta") for k, v in model.state_dict().items() if k != "llm.lm_head.weight"}
    alive, most = [], [0]

    def fetch(name):
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most[0] = max(most[0], len(alive))
        t = model.state_dict()[name].clone()
        alive.append(weakref.ref(t))
        return t

    convert.write_converted(model.cfg, tensors, fetch, tmp_path / "q", quant=M.QuantConfig(bits=4, group_size=32))
    assert most[0] <= 1
    assert M.load_model(tmp_path / "q").cfg.quant.bits == 4


def rss_file():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or tuple(map(int, os.uname().release.split(".")[:2])) < (5, 4),
                    reason="measures Linux's resident file pages; MADV_PAGEOUT needs Linux 5.4")
@pytest.mark.parametrize("quant", [None, M.QuantConfig(bits=8)], ids=["cast", "int8"])
def test_converting_a_mapped_checkpoint_hands_its_pages_back(tmp_path, quant):
    """Every source page read stays resident while the mapping lives unless files.release gives it
    back: the source (64 MiB of embedding) must not stay in memory, and what is written must
    still be exactly what the (re-read) source holds."""
    model = tiny_model(moe=False)
    model.llm.embed.weight.data = torch.randn(2**18, model.cfg.llm.hidden_size)  # 64 MiB of fp32
    model.cfg.llm.vocab_size = 2**18
    model.llm.lm_head.weight = model.llm.embed.weight
    M.save_model(model, tmp_path / "src")
    tensors = files.read_safetensors(tmp_path / "src" / "model.safetensors")
    gc.collect()  # an earlier test's mappings go now, not while this one measures
    before = rss_file()
    convert.write_converted(model.cfg, tensors, tensors.__getitem__, tmp_path / "out", dtype=torch.bfloat16, quant=quant)
    assert rss_file() - before < 16 * 2**20, (rss_file() - before) / 2**20  # tensors still maps all 64+ MiB
    out = files.read_safetensors(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["llm.embed.weight"], tensors["llm.embed.weight"].bfloat16())


def test_release_never_loses_data():
    """Memory that is not a file's (here a tensor's own) keeps its values: release is only a hint."""
    t = torch.randn(2**20)
    want = t.clone()
    files.release(t)
    assert torch.equal(t, want)


def test_bad_quantization_inputs_are_one_line(tmp_path, float_ckpt):
    def clean_error(result, *words):
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and all(w in result.output for w in words), result.output

    run("convert", tmp_path / "q", "--model", float_ckpt, "--quantize", "int8")
    clean_error(run("convert", tmp_path / "qq", "--model", tmp_path / "q", "--quantize", "int4"), "already quantized")
    # a checkpoint whose scales are missing
    tensors = files.read_safetensors(tmp_path / "q" / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in tensors.items() if k != "llm.layers.0.attn.q_proj.scales"}, tmp_path / "q" / "model.safetensors")
    with pytest.raises(M.MedMoEError, match=r"missing tensor 'llm\.layers\.0\.attn\.q_proj\.scales'"):
        M.load_model(tmp_path / "q")
    # int4 checkpoints in older layouts: before the tiled one (no int4_layout), and tiles of 4 rows (2)
    run("convert", tmp_path / "old4", "--model", float_ckpt, "--quantize", "int4", "--group-size", "32")
    config = json.loads((tmp_path / "old4" / "config.json").read_text())
    for layout in (None, 2):
        quant = {k: v for k, v in config["quant"].items() if k != "int4_layout"} | ({"int4_layout": layout} if layout else {})
        (tmp_path / "old4" / "config.json").write_text(json.dumps({**config, "quant": quant}))
        clean_error(run("info", tmp_path / "old4"), "older layout", "re-run")
    # int4 on a matrix whose input size no group size divides
    model = tiny_model()
    model.cfg.llm.vocab_size = 256
    M.save_model(M.MedMoE(M.Config(**{**model.cfg.__dict__, "vision": M.VisionConfig(
        image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4)})), tmp_path / "odd")
    clean_error(run("convert", tmp_path / "q4", "--model", tmp_path / "odd", "--quantize", "int4"), "cannot quantize projector")


# ----------------------------------------------------------------------------- weight-only bf16
# The oracle: the fp32 model whose matrices hold the bf16-rounded values. Stored in bf16, they must
# compute exactly that (every product in fp32), up to fp32 summation order.
FP32_TOL = 1e-5


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather", "auto"])
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (5, 1), (64, 2)])
@pytest.mark.parametrize("compiled", [False, True])
def test_every_dispatch_path_computes_fp32_on_bf16_stored_experts(impl, T, k, compiled):
    w, _ = quantized_experts(8, gated=True, bias=True)
    w = {n: v if n.startswith("b") else kernels.dequantize(*v) for n, v in w.items()}
    stored = {n: v.bfloat16() if n.startswith("w") else v for n, v in w.items()}
    rounded = {n: v.bfloat16().float() if n.startswith("w") else v for n, v in w.items()}
    x, idx, weight = routed(T, k)
    torch._dynamo.reset()
    fn = torch.compile(kernels.moe_mlp, fullgraph=True, dynamic=False) if compiled else kernels.moe_mlp
    with torch.no_grad():
        got = moe(x, idx, weight, stored, impl, fn)
        assert got.dtype == torch.float32
        assert rel_err(got, moe(x, idx, weight, rounded, "loop")) < FP32_TOL


@pytest.mark.parametrize("rows", [1, 3, 40])  # a few rows: the weight upcast in blocks (with a tail); many: at once
def test_linear_on_a_bf16_weight_computes_fp32(rows):
    w, b = torch.randn(2 * kernels.NARROW_CHUNK + 100, 64).bfloat16(), torch.randn(2 * kernels.NARROW_CHUNK + 100)
    x = torch.randn(2, rows, 64)
    got = kernels.linear(x, w, b)
    assert got.dtype == torch.float32 and rel_err(got, F.linear(x.double(), w.double(), b.double())) < FP32_TOL


def rounded_twin(model):
    """The fp32 model whose matrices hold their bf16-rounded values."""
    twin = M.MedMoE(model.cfg).eval()
    names = M.matrix_names(model)
    twin.load_state_dict({k: v.float().bfloat16().float() if k in names else v.float() for k, v in model.state_dict().items()})
    return twin


def test_weight_only_bf16_model_computes_fp32_on_bf16_matrices(float_ckpt):
    model = M.load_model(float_ckpt, dtype=torch.float32, matrix_dtype=torch.bfloat16)
    bf16 = {k for k, v in model.state_dict().items() if v.dtype == torch.bfloat16}
    i, layer = next((i, b) for i, b in enumerate(model.llm.layers) if isinstance(b.ffn, M.MoE))
    assert {"llm.embed.weight", f"llm.layers.{i}.attn.q_proj.weight", f"llm.layers.{i}.ffn.experts.up_proj",
            f"llm.layers.{i}.ffn.meta_expert.down_proj.weight", "projector.0.weight", "vision.layers.0.ffn.up_proj.weight"} <= bf16
    assert layer.ffn.router.weight.dtype == layer.attn_norm.weight.dtype == model.vision.pos_embed.dtype == torch.float32
    assert model.llm.dtype == torch.float32 and not any(".router." in k or "norm" in k for k in bf16)
    twin = rounded_twin(model)
    ids = [[5, 6, M.IMAGE_TOKEN, *range(7, 20)], [9, 10, M.IMAGE_TOKEN, 11]]
    ids = [[t for i in seq for t in ([i] * model.cfg.vision.num_patches if i == M.IMAGE_TOKEN else [i])] for seq in ids]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, _ = model(ids, pixels)
        want, _ = twin(ids, pixels)
    assert got.dtype == torch.float32 and rel_err(got, want) < FP32_TOL
    prompt = [[5, 6, 7]]
    assert model.generate(prompt, max_new_tokens=10, stop_ids=[]) == twin.generate(prompt, max_new_tokens=10, stop_ids=[])
    assert model.generate(prompt, max_new_tokens=10, stop_ids=[], compile=True) == twin.generate(prompt, max_new_tokens=10, stop_ids=[])
    with pytest.raises(M.MedMoEError, match="float checkpoint"):
        M.load_model(float_ckpt, matrix_dtype=torch.bfloat16, quant=M.QuantConfig(bits=8))
