"""The matvec kernels (mixtral.kernels) against torch references on random data, and their torch fallbacks.

Where the compiled kernels are unavailable (no compiler, no AVX512) every test runs the fallback path instead, and a
warning in the summary says so. Tolerances: fp32 results within 1e-5 of the output's magnitude (the kernels sum in
another order); bf16 results within one bf16 rounding of the output (2^-8 relative, bf16 keeping 8 significant bits)
plus that fp32 allowance; quantized kernels against x @ dequantize(...).T in fp32 math, equally tight.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.kernels import cpu

EXPERTS = torch.tensor([[1, 1], [2, 3], [1, 7], [0, 2], [5, 5]])  # (T=5, Kt=2): repeats within and across tokens


def routing(t: int) -> torch.Tensor:
    """(T, 2) expert ids: the hand-made table, or for a batch (T > 5) random ids, many tokens per expert."""
    return EXPERTS[:t] if t <= len(EXPERTS) else torch.randint(0, 8, (t, 2), generator=torch.Generator().manual_seed(t))


@pytest.fixture(scope="module", autouse=True)
def backend() -> bool:
    available = kernels.available()  # the first call builds (once per machine)
    if not available:
        warnings.warn("mixtral CPU kernels unavailable here: these tests check the torch fallbacks only")
    forced = os.environ.get("MIXTRAL_ISA")
    assert not forced or cpu.isa() == forced, f"MIXTRAL_ISA={forced} but the kernels in use are {cpu.isa()}"
    print(f"\nmixtral.kernels: {cpu.isa() or 'torch fallbacks'}")
    return available


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, extra: torch.Tensor | float = 0.0) -> None:
    """ours (any float dtype) against an fp32 reference, with the tolerance of ours' dtype (see the module doc) plus
    `extra`, the error a rounded intermediate may add."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.float() - ref).abs()
    allowed = 1e-5 * ref.abs().max() + (2**-8 * ref.abs() if ours.dtype == torch.bfloat16 else 0) + extra
    assert (err <= allowed).all(), f"max error {err.max():.3g}, worst excess {(err - allowed).max():.3g}"


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- fp32 / bf16 ---------------------------------------------------------------------------------------------
# m: bf16 streams one weight row at a time for up to 2 rows of x, on rows of up to 4 KiB ((6, 2080) has longer ones);
# 65 is above MAX_ROWS, F.linear's path. n, k: K % 32 == 0 and tails, and N under a tile's 4 rows.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 16, 64, 65])
@pytest.mark.parametrize("n, k", [(37, 1024), (37, 77), (5, 32), (3, 1), (6, 2080)])
def test_linear(dtype, m, n, k):
    x, w = randn(m, k, dtype=dtype, seed=1), randn(n, k, dtype=dtype, seed=2)
    y = kernels.linear(x, w)
    assert y.dtype == dtype
    assert_matches(y, F.linear(x.float(), w.float()))


def test_linear_keeps_leading_dims():
    x, w = randn(2, 3, 64), randn(9, 64)
    assert_matches(kernels.linear(x, w), F.linear(x, w))


def test_bf16_paths_agree():
    """The two bf16 kernels: VDPBF16PS (the default here) and widening weights to fp32 (CPUs without AVX512_BF16)."""
    if not kernels.has_bf16_dot():
        pytest.skip("needs the compiled kernels on a CPU with AVX512_BF16")
    x, w = randn(3, 100, dtype=torch.bfloat16), randn(21, 100, dtype=torch.bfloat16, seed=1)
    ref = F.linear(x.float(), w.float())
    assert_matches(cpu.extension().linear(x, w, None, True), ref)
    assert_matches(cpu.extension().linear(x, w, None, False), ref)


@pytest.mark.parametrize("level", ["avx2", "avx512", "avx512_vnni"])  # avx512_bf16 is the top level
def test_every_isa_level(level):
    """This file's tests again, in a fresh process, at each instruction-set level below the host's best that it can run
    (MIXTRAL_ISA): AVX2 (matvec_portable.cpp), AVX-512 without VDPBF16PS. The host's own level is this process's run."""
    if os.environ.get("MIXTRAL_ISA"):
        pytest.skip("already a run at a forced level")
    levels = cpu.supported_levels()
    if level not in levels[:-1] or not kernels.available():
        pytest.skip(f"{level} is not below this CPU's best level ({levels[-1] if levels else 'none'}) or cannot build")
    env = {**os.environ, "MIXTRAL_ISA": level}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "not cores_without_torch"], env=env,  # those do not depend on the level
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]


ISA_TEST = Path(__file__).with_name("kernels") / "isa_test.cpp"


@pytest.mark.parametrize("level", list(cpu.LEVELS))
def test_kernel_cores_without_torch(level, tmp_path):
    """tests/kernels/isa_test.cpp: the matvec, attention and elementwise cores, built without torch at one level,
    against scalar references. NEON is cross-compiled (g++-aarch64-linux-gnu) and run under qemu-user (Debian's
    packages, which .ci/run installs); the x86 levels run natively where the CPU has them."""
    flags = list(cpu.LEVELS[level].cflags)
    if level == "neon":
        compiler, runner = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
        if not (compiler and runner):
            pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user)")
        flags.append("-static")
        run = [runner, str(tmp_path / "isa_test")]
    else:
        compiler = shutil.which("g++")
        if compiler is None or level not in cpu.supported_levels():
            pytest.skip(f"needs g++ and a CPU with {level}")
        run = [str(tmp_path / "isa_test")]
    built = subprocess.run([compiler, "-std=c++17", "-O2", *flags, "-o", str(tmp_path / "isa_test"), str(ISA_TEST)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "ok", done.stdout[-3000:]
    assert done.stdout.count("max error") >= 200  # every check ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 64])
def test_expert_linear(dtype, t):
    x, w, experts = randn(t, 96, dtype=dtype), randn(8, 33, 96, dtype=dtype, seed=1), routing(t)
    y = kernels.expert_linear(x, w, experts)  # (T, Kt, N)
    assert_matches(y, torch.einsum("tk,tjnk->tjn", x.float(), w.float()[experts]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_threads(dtype):
    """Output rows split between threads (the tests otherwise run on one), with rows left over from the tiles."""
    x, w = randn(2, 256, dtype=dtype), randn(1001, 256, dtype=dtype, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = kernels.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert_matches(y, F.linear(x.float(), w.float()))


# ---- int8 ----------------------------------------------------------------------------------------------------
def test_quantize_int8_error():
    w = randn(3, 16, 100)
    w[0, 0] = 0  # an all-zero row: scale 0, codes 0
    qweight, scale = kernels.quantize_int8(w)
    assert qweight.dtype == torch.int8 and qweight.shape == w.shape and scale.shape == (3, 16)
    assert qweight.abs().max() <= 127
    err = (kernels.dequantize_int8(qweight, scale) - w).abs().amax(dim=-1)
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert (kernels.dequantize_int8(qweight, scale)[0, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 65])
@pytest.mark.parametrize("k", [256, 77])
def test_linear_int8(dtype, m, k):
    x, (qweight, scale) = randn(m, k, dtype=dtype), kernels.quantize_int8(randn(37, k, seed=1))
    y = kernels.linear_int8(x, qweight, scale)
    assert y.dtype == dtype
    assert_matches(y, F.linear(x.float(), kernels.dequantize_int8(qweight, scale)))


@pytest.mark.parametrize("t", [1, 5, 64])
def test_expert_linear_int8(t):
    x, (qweight, scale), experts = randn(t, 100), kernels.quantize_int8(randn(8, 33, 100, seed=1)), routing(t)
    y = kernels.expert_linear_int8(x, qweight, scale, experts)
    assert_matches(y, torch.einsum("tk,tjnk->tjn", x, kernels.dequantize_int8(qweight, scale)[experts]))


def test_quantize_int8_groups():
    """Grouped int8 (llama.cpp's Q8_0 in groups of 32): an fp16 scale a group, max |w| / 127; weights that are
    such values come back exactly, others within scale / 2."""
    q = torch.randint(-127, 128, (2, 8, 96), generator=torch.Generator().manual_seed(0))
    q[..., ::32] = 127  # each group's largest magnitude is code 127
    d = (torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(1)) + 0.5).half()
    w = q * d.float().repeat_interleave(32, -1)
    qweight, scale = kernels.quantize_int8(w, 32)
    assert qweight.dtype == torch.int8 and scale.shape == (2, 8, 3) and scale.dtype == torch.float16
    assert torch.equal(qweight, q.to(torch.int8)) and torch.equal(scale, d)
    assert torch.equal(kernels.dequantize_int8(qweight, scale), w)
    w2 = randn(4, 16, 256)
    w2[0, 0, 64:128] = 0  # all-zero groups: scale 0, codes 0
    qweight, scale = kernels.quantize_int8(w2, 64)
    err = (kernels.dequantize_int8(qweight, scale) - w2).abs().unflatten(-1, (4, 64)).amax(dim=-1)
    assert (err <= scale.float() / 2 * (1 + 1e-3)).all() and scale[0, 0, 1] == 0
    with pytest.raises(ValueError):
        kernels.quantize_int8(randn(4, 100), 32)


# k, group size: K = 32 mod 64 (a last half chunk), groups straddling chunks (96), one group a row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 65])
@pytest.mark.parametrize("k, group_size", [(256, 32), (160, 32), (288, 96), (128, 128)])
def test_linear_int8_groups(dtype, m, k, group_size):
    x, (qweight, scale) = randn(m, k, dtype=dtype), kernels.quantize_int8(randn(37, k, seed=1), group_size)
    y = kernels.linear_int8(x, qweight, scale)
    assert y.dtype == dtype
    assert_matches(y, F.linear(x.float(), kernels.dequantize_int8(qweight, scale)))


@pytest.mark.parametrize("t", [1, 5, 64])
def test_expert_linear_int8_groups(t):
    x, experts = randn(t, 160), routing(t)
    qweight, scale = kernels.quantize_int8(randn(8, 33, 160, seed=1), 32)
    y = kernels.expert_linear_int8(x, qweight, scale, experts)
    assert_matches(y, torch.einsum("tk,tjnk->tjn", x, kernels.dequantize_int8(qweight, scale)[experts]))


# ---- int4 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [128, 32, 6])
def test_quantize_int4_error(group_size):
    w = randn(2, 16, 384)
    w[0, 0, :group_size] = 0.5  # a constant group: scale 0, every code 0, zero = the value
    packed, scales, zeros = kernels.quantize_int4(w, group_size)
    g = 384 // group_size
    assert packed.dtype == torch.uint8 and packed.shape == (2, 16, 192)
    assert scales.shape == zeros.shape == (2, 16, g)
    w_hat = kernels.dequantize_int4(packed, scales, zeros)
    err = (w_hat - w).abs().unflatten(-1, (g, group_size)).amax(dim=-1)  # (..., N, G)
    assert (err <= scales / 2 * (1 + 1e-5) + 1e-6 * zeros.abs()).all()
    assert (w_hat[0, 0, :group_size] == 0.5).all()
    # the packing: column 2i in the low nibble of byte i, 2i + 1 in the high one
    q = ((w - zeros.repeat_interleave(group_size, -1)) / scales.repeat_interleave(group_size, -1)).round()
    assert torch.equal(packed[1] & 15, q[1, :, 0::2].to(torch.uint8))
    assert torch.equal(packed[1] >> 4, q[1, :, 1::2].to(torch.uint8))


def test_quantize_int4_symmetric():
    """llama.cpp's Q4_0: w = (q - 8) d, no zeros. Weights that are such values (code 0 in every group, d in fp16)
    come back exactly; others within |d|."""
    q = torch.randint(0, 16, (2, 8, 128), generator=torch.Generator().manual_seed(0))
    q[..., ::32] = 0  # each group's largest magnitude is -8 d
    d = (torch.rand(2, 8, 4, generator=torch.Generator().manual_seed(1)) + 0.5).half()
    w = (q - 8) * d.float().repeat_interleave(32, -1)
    packed, scales, zeros = kernels.quantize_int4(w, 32, symmetric=True)
    assert zeros.shape == (2, 8, 0) and scales.dtype == torch.float16
    assert torch.equal(scales, d) and torch.equal(kernels.dequantize_int4(packed, scales, zeros), w)
    w2 = randn(4, 64, 256)
    packed, scales, zeros = kernels.quantize_int4(w2, 32, symmetric=True)
    err = (kernels.dequantize_int4(packed, scales, zeros) - w2).abs().unflatten(-1, (8, 32)).amax(dim=-1)
    # within |d| / 2, except that codes stop at 7 d on the side away from the largest magnitude (-8 d): within |d|
    assert (err <= scales.float().abs() * (1 + 1e-3)).all()


def test_quantize_int4_rejects_bad_shapes():
    with pytest.raises(ValueError):
        kernels.quantize_int4(randn(4, 100), 128)
    with pytest.raises(ValueError):
        kernels.quantize_int4(randn(4, 63), 63)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 65])
@pytest.mark.parametrize("k, group_size, symmetric", [(512, 128, False), (512, 256, False), (192, 64, False),
                                                      (576, 32, False), (160, 32, False), (96, 48, False),
                                                      (576, 32, True), (160, 32, True), (512, 128, True),
                                                      (192, 64, True), (512, 256, True)])
def test_linear_int4(dtype, m, k, group_size, symmetric):
    x = randn(m, k, dtype=dtype)
    packed, scales, zeros = kernels.quantize_int4(randn(37, k, seed=1), group_size, symmetric)
    y = kernels.linear_int4(x, packed, scales, zeros)
    assert y.dtype == dtype
    assert_matches(y, F.linear(x.float(), kernels.dequantize_int4(packed, scales, zeros)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 x: the VDPBF16PS kernel, any group size
@pytest.mark.parametrize("t", [1, 5, 64])
@pytest.mark.parametrize("k, group_size, symmetric", [(256, 128, False), (320, 32, False), (192, 64, False),
                                                      (512, 256, False), (320, 32, True), (256, 128, True)])
def test_expert_linear_int4(dtype, t, k, group_size, symmetric):
    x, experts = randn(t, k, dtype=dtype), routing(t)
    packed, scales, zeros = kernels.quantize_int4(randn(8, 33, k, seed=1), group_size, symmetric)
    y = kernels.expert_linear_int4(x, packed, scales, zeros, experts)
    ref = torch.einsum("tk,tjnk->tjn", x.float(), kernels.dequantize_int4(packed, scales, zeros)[experts])
    assert_matches(y, ref)


# ---- opt-in int8 activations (llama.cpp's Q8_0 x with Q4_0 / Q8_0 weights) --------------------------------------
def quantize_x_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) rounded as the int8-activation kernels round it: per block of 32, scale max|x| / 127, codes
    round(x * 127 / max|x|); returned dequantized (fp32)."""
    x_GS = x.float().unflatten(-1, (-1, 32))
    amax = x_GS.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # not 127 / amax: that is 127 * (1 / amax)
    return ((x_GS * inv).round() * (amax / 127)).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("t", [1, 3, 64])
def test_int8_activations(dtype, bits, t, monkeypatch):
    """MIXTRAL_INT8_ACTIVATIONS: the Q4_0 / Q8_0 kernels with x rounded to int8 per block equal the float product of
    that rounded x with the dequantized weights; and they differ from the float path by no more than x's rounding."""
    if not kernels.has_int8_dot():
        pytest.skip("needs the compiled kernels on x86")
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    w, x, experts = randn(8, 37, 320, seed=1), randn(t, 320, dtype=dtype, seed=2), routing(t)
    if bits == 4:
        parts = kernels.quantize_int4(w, 32, symmetric=True)
        dense, call = kernels.dequantize_int4(*parts), lambda x_, w_: kernels.linear_int4(x_, *w_)
        routed = kernels.expert_linear_int4(x, *parts, experts)
    else:
        parts = kernels.quantize_int8(w, 32)
        dense, call = kernels.dequantize_int8(*parts), lambda x_, w_: kernels.linear_int8(x_, *w_)
        routed = kernels.expert_linear_int8(x, *parts, experts)
    y = call(x, [p[2] for p in parts])
    x_rounded = quantize_x_blocks(x)
    assert_matches(y, F.linear(x_rounded, dense[2]))
    assert_matches(routed, torch.einsum("tk,tjnk->tjn", x_rounded, dense[experts]))
    # against x unrounded: each block's error is at most half a step, max|x_block| / 254, times sum |w|
    bound = (x.float().unflatten(-1, (-1, 32)).abs().amax(-1) / 254) @ dense[2].abs().unflatten(-1, (-1, 32)).sum(-1).T
    assert_matches(y, F.linear(x.float(), dense[2]), extra=bound * 1.001)


# ---- fallbacks -----------------------------------------------------------------------------------------------
def run_all(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every function on the same random inputs; x (T, 256)."""
    w = randn(8, 33, 256, dtype=x.dtype, seed=1)
    q8, q4 = kernels.quantize_int8(w), kernels.quantize_int4(w)
    experts = EXPERTS[: x.shape[0]]
    return dict(linear=kernels.linear(x, w[3]), expert_linear=kernels.expert_linear(x, w, experts),
                linear_int8=kernels.linear_int8(x, q8[0][3], q8[1][3]),
                expert_linear_int8=kernels.expert_linear_int8(x, *q8, experts),
                linear_int4=kernels.linear_int4(x, *(t[3] for t in q4)),
                expert_linear_int4=kernels.expert_linear_int4(x, *q4, experts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_matches_kernels(dtype, monkeypatch):
    x = randn(5, 256, dtype=dtype)
    ours = run_all(x)
    monkeypatch.setattr(cpu, "extension", lambda: None)
    assert not kernels.available()
    torch_ = run_all(x)
    for name in ours:
        assert ours[name].dtype == torch_[name].dtype == dtype, name
        ref = torch_[name].float()
        # a bf16 reference is rounded too: the two roundings may land a whole ulp (2^-7 relative) apart
        assert_matches(ours[name], ref, 2**-8 * ref.abs() if dtype == torch.bfloat16 else 0.0)


def test_grad_takes_torch_path():
    x, w = randn(1, 64).requires_grad_(), randn(9, 64).requires_grad_()
    kernels.linear(x, w).sum().backward()
    assert torch.allclose(w.grad, x.detach().expand(9, 64))
    experts = torch.tensor([[1, 0]])
    we = randn(2, 9, 64).requires_grad_()
    kernels.expert_linear(x.detach(), we, experts).sum().backward()
    assert torch.allclose(we.grad, x.detach().expand(2, 9, 64))


def test_non_contiguous_weights():
    x, w = randn(2, 64), randn(64, 9).t()  # (9, 64), not contiguous: F.linear's path
    assert_matches(kernels.linear(x, w), F.linear(x, w))


# ---- attention over a KV cache -------------------------------------------------------------------------------
def _attention_reference(q, k, v, allowed, scale):
    """fp64 softmax(q k^T * scale) v with explicit GQA (rows that see nothing give zeros), and probs @ |v|: rounding
    the probabilities to bf16 (prefill in bf16, ours and sdpa's) moves the output by at most 2^-8 of that."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q.double() @ k.transpose(2, 3) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).float(), (probs @ v.abs()).float()


# s <= MAX_ROWS: `attend` (decoding); above: `prefill_attend` with head sizes that are multiples of 32 (64, 96: a
# last 32-dim slice), sdpa otherwise (head size 70). t > s: a causal prompt after cached tokens.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, nh, nkv, s, t, d", [(1, 16, 4, 1, 96, 64), (2, 8, 2, 3, 40, 48), (3, 4, 4, 5, 5, 64),
                                                 (1, 6, 1, 1, 300, 128), (2, 4, 2, 16, 20, 70),
                                                 (1, 16, 4, 100, 100, 64), (2, 4, 2, 70, 133, 96),
                                                 (1, 4, 1, 65, 65, 70)])
@pytest.mark.parametrize("masking", ["mask", "broadcast mask", "causal", "static cache"])
def test_attention(dtype, b, nh, nkv, s, t, d, masking):
    q = randn(b, s, nh, d, dtype=dtype, seed=1).transpose(1, 2)  # (B, nh, S, D) with the layout attention makes
    k, v = randn(b, nkv, t, d, dtype=dtype, seed=2), randn(b, nkv, t, d, dtype=dtype, seed=3)
    mask = torch.rand(b, 1, s, t, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[0, 0, 0] = False  # a query that sees nothing (a padding position): zeros
    if masking == "broadcast mask":
        mask = mask[:1]
    if masking == "static cache":  # each query sees a run of slots, the rest unwritten (the kernel skips past it)
        ends = torch.randint(0, t + 1, (b, 1, s, 1), generator=torch.Generator().manual_seed(5))
        mask = (torch.arange(t) < ends) & (torch.rand(b, 1, s, t, generator=torch.Generator().manual_seed(6)) > 0.1)
    causal = torch.ones(s, t, dtype=torch.bool).tril(t - s)  # query i at slot i + t - s
    out = kernels.attention(q, k, v, None if masking == "causal" else mask, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    ref, spread = _attention_reference(q, k, v, causal if masking == "causal" else mask, d**-0.5)
    # the prompt kernel rounds the probabilities to bf16, as sdpa does (the path without the kernels); attend does not
    rounded_probs = dtype == torch.bfloat16 and (s > kernels.MAX_ROWS or not kernels.available())
    assert_matches(out, ref, 2**-8 * spread if rounded_probs else 0.0)


def test_prefill_attention_as_accurate_as_sdpa():
    """The bf16 prompt kernel, called directly, against sdpa's bf16 kernel: no larger error from the fp64 truth."""
    if not kernels.has_bf16_dot():
        pytest.skip("needs the compiled kernels on a CPU with AVX512_BF16")
    q = randn(1, 300, 8, 64, dtype=torch.bfloat16, seed=1).transpose(1, 2)
    k, v = randn(1, 2, 300, 64, dtype=torch.bfloat16, seed=2), randn(1, 2, 300, 64, dtype=torch.bfloat16, seed=3)
    ref, _ = _attention_reference(q, k, v, torch.ones(300, 300, dtype=torch.bool).tril(), 0.125)
    ours = torch.ops.mixtral_kernels.prefill_attend(q, k, v, None, 0.125, True).float()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True).float()
    err_ours, err_sdpa = (ours - ref).abs(), (sdpa - ref).abs()
    assert err_ours.mean() <= 1.05 * err_sdpa.mean() and err_ours.max() <= 1.05 * err_sdpa.max()


# ---- expert MLPs over sorted tokens --------------------------------------------------------------------------
@pytest.mark.parametrize("inter", [40, 520])  # 2 x 520 = 1040 gate/up columns: fp32 runs them in two blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp_equals_the_loop(dtype, inter):
    """One expert per thread, each row times its routing weight: the experts one by one in fp32 math, within the
    dtype's rounding (in bf16 also the rounding of silu(gate) * up, which the kernel rounds once, from fp32)."""
    counts = [5, 0, 17, 1, 9]  # an unused expert, uneven loads; 17 x 40 and 24 columns: vector tails
    x, gate_up = randn(32, 24, dtype=dtype), randn(5, 2 * inter, 24, dtype=dtype, seed=1)
    down = randn(5, 24, inter, dtype=dtype, seed=2)
    weights = torch.rand(32, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = kernels.expert_mlp(x, gate_up, down, counts, weights)
    finally:
        torch.set_num_threads(before)
    if not kernels.available():
        assert y is None
        return
    assert y.dtype == dtype
    starts = [sum(counts[:e]) for e in range(5)]
    for e, (s, n) in enumerate(zip(starts, counts)):
        if n == 0:
            continue
        gate, up = F.linear(x[s:s + n].float(), gate_up[e].float()).chunk(2, dim=-1)
        h = F.silu(gate) * up
        ref = F.linear(h, down[e].float()) * weights[s:s + n, None]
        spread = F.linear(h.abs(), down[e].float().abs()) * weights[s:s + n, None]  # rounding h moves y by 2^-8 of it
        assert_matches(y[s:s + n], ref, 2**-8 * spread if dtype == torch.bfloat16 else 0.0)
    with pytest.raises(RuntimeError, match="sum to 31 but x has 32 rows"):
        kernels.expert_mlp(x, gate_up, down, [5, 0, 16, 1, 9])


def test_expert_mlp_leaves_trainable_routing_weights_to_autograd():
    """Routing weights that need a gradient (a router being trained beside frozen experts): the torch path."""
    x, gate_up, down = randn(3, 8), randn(2, 12, 8, seed=1), randn(2, 8, 6, seed=2)
    weights = torch.rand(3, requires_grad=True)
    assert kernels.expert_mlp(x, gate_up, down, [1, 2], weights) is None
    assert kernels.expert_mlp(x, gate_up, down, [1, 2], weights.detach()) is not None or not kernels.available()


def test_expert_mlp_under_inference_mode_with_parameters():
    """Model weights are parameters (requires_grad) and inputs may be inference tensors: no graph is recorded."""
    gate_up, down = torch.nn.Parameter(randn(2, 8, 6)), torch.nn.Parameter(randn(2, 6, 4, seed=1))
    with torch.inference_mode():
        x = randn(5, 6)
        y = kernels.expert_mlp(x, gate_up, down, [2, 3])
        if y is not None:
            gate, up = F.linear(x[:2], gate_up[0]).chunk(2, dim=-1)
            assert_matches(y[:2], F.linear(F.silu(gate) * up, down[0]))
