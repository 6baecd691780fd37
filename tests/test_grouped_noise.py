"""Tests of dancegrpo_fast.noise (grouped counter-based Gaussian noise) and its C++/CUDA extension.

CPU-only and fast; the test marked `cuda` runs on a GPU machine. The reference is Triton's own
`tl.randn`, run by the Triton interpreter (TRITON_INTERPRET=1, which must be set before triton is
imported and applies to the whole process). When this process already runs Triton interpreted
(scripts/test.sh sets TRITON_INTERPRET=1) the reference kernel runs in-process; otherwise (e.g. the
GPU check, where the other test modules' kernels must compile) this file is run once as a script in
a subprocess that sets TRITON_INTERPRET=1 before importing triton.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

if __name__ == "__main__":  # the reference subprocess (see triton_randn_reference)
    os.environ["TRITON_INTERPRET"] = "1"  # before importing triton

import pytest
import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is in the test extras
    HAVE_TRITON = False

TRITON_INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if HAVE_TRITON:

    @triton.jit
    def _randn_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)  # int64 scalar loaded from memory, like the rollout kernels
        tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < n)


def _run_randn_kernel(seed: int, n: int, block: int, device="cpu") -> torch.Tensor:
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    _randn_kernel[(triton.cdiv(n, block),)](seed_t, out, n, BLOCK=block)
    return out


if __name__ == "__main__":  # python test_grouped_noise.py REQUESTS.pt RESULTS.pt
    _requests = torch.load(sys.argv[1])
    torch.save({r: _run_randn_kernel(*r) for r in _requests}, sys.argv[2])
    sys.exit(0)

import dancegrpo_fast.noise as noise  # noqa: E402
from dancegrpo_fast.noise import (  # noqa: E402
    extension_status,
    grouped_noise,
    philox_normal_torch,
    seed_for_step,
)

REPO = Path(__file__).resolve().parents[1]
EXT = extension_status()
needs_ext = pytest.mark.skipif(
    not EXT["built"], reason=f"dancegrpo_fast._C is not built ({EXT['error']}); "
    "build it with `pip install --no-build-isolation -e .`")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

SEEDS = [0, 1, 12345, -1, -7, 2**32, 2**32 + 7, 2**40 + 3, -98765432123, 2**63 - 1, -(2**63)]
# float32 rounding of log/sqrt/cos differs by an ulp or two between libm, SLEEF, numpy and CUDA;
# |normal| < 5.7 so an ulp is at most 4.8e-7.
ATOL, RTOL = 1e-6, 1e-7

# (seed, numel, block) triples computed by Triton; numels are not multiples of the block.
GROUPED_SEEDS, GROUPED_SHAPE = [5, -3, 2**33 + 1], (3, 7, 11)
REFERENCE_REQUESTS = ([(s, 3000, 1024) for s in SEEDS]
                      + [(s, math.prod(GROUPED_SHAPE), 64) for s in GROUPED_SEEDS]
                      + [(s, 40, 16) for s in (0, -1, 2**32 + 7)])


@pytest.fixture(scope="module")
def triton_ref(tmp_path_factory):
    """{(seed, numel, block): tl.randn(seed, arange(numel))} from the Triton interpreter."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if TRITON_INTERPRETED:
        return {r: _run_randn_kernel(*r) for r in REFERENCE_REQUESTS}
    d = tmp_path_factory.mktemp("triton_ref")
    torch.save(REFERENCE_REQUESTS, d / "requests.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(d / "requests.pt"),
                          str(d / "results.pt")], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "Triton reference subprocess failed:\n" + res.stdout + res.stderr
    return torch.load(d / "results.pt")


# ---------------------------------------------------------------------------------------------
# (1) PyTorch fallback == Triton tl.randn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_torch_fallback_matches_triton_randn(seed, triton_ref):
    n = 3000  # not a multiple of the block
    ref = triton_ref[(seed, n, 1024)]
    got = philox_normal_torch([seed], n)
    assert got.shape == (1, n) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], ref, atol=ATOL, rtol=RTOL)
    # most values are bit-identical; the others differ by float32 rounding only
    assert (got[0] == ref).float().mean() > 0.3


def test_grouped_noise_matches_triton_randn_all_backends(triton_ref):
    n = math.prod(GROUPED_SHAPE)
    backends = ["torch"] + (["extension"] if EXT["built"] else [])
    for backend in backends:
        out = grouped_noise(GROUPED_SEEDS, 2, GROUPED_SHAPE, backend=backend)
        assert out.shape == (6, *GROUPED_SHAPE)
        for p, s in enumerate(GROUPED_SEEDS):
            ref = triton_ref[(s, n, 64)].view(GROUPED_SHAPE)
            for g in range(2):
                torch.testing.assert_close(out[2 * p + g], ref, atol=ATOL, rtol=RTOL)


@needs_ext
def test_extension_scalar_reference_matches_triton(triton_ref):
    for s in (0, -1, 2**32 + 7):
        ref = triton_ref[(s, 40, 16)]
        got = torch.tensor([noise._C.philox_normal_scalar(s, j) for j in range(40)], dtype=torch.float32)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_known_philox_values():
    # Philox4x32-10 known-answer test (Random123 kat_vectors): counter 0, key 0 ->
    # 6627e8d5 e169c58d bc57ac4c 9b00dbd8; we use the first two words.
    from dancegrpo_fast.noise import _MASK32, _mulhilo32

    c = [torch.tensor([0], dtype=torch.int64) for _ in range(4)]
    k0, k1 = 0, 0
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c[2])
        hi_a, lo_a = _mulhilo32(0xD2511F53, c[0])
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    assert [int(x) for x in c] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# ---------------------------------------------------------------------------------------------
# (2) C++ extension == PyTorch fallback
# ---------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("shape", [(4, 9, 9), (1000,), (), (2, 0, 3)])
def test_extension_matches_torch_fallback(shape):
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    a = grouped_noise(seeds, 3, shape, backend="extension")
    b = grouped_noise(seeds, 3, shape, backend="torch")
    assert a.shape == b.shape == (len(SEEDS) * 3, *shape)
    assert a.is_contiguous() and b.is_contiguous()
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@needs_ext
def test_extension_matches_torch_fallback_large():
    seeds = torch.tensor([3, -11], dtype=torch.int64)
    n = 200_003
    a = grouped_noise(seeds, 1, (n,), backend="extension")
    b = philox_normal_torch(seeds, n)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_torch_fallback_chunking(monkeypatch):
    seeds = [1, -2, 3]
    whole = philox_normal_torch(seeds, 5003)
    monkeypatch.setattr(noise, "_FALLBACK_CHUNK", 1000)  # several column chunks
    assert torch.equal(philox_normal_torch(seeds, 5003), whole)


@needs_ext
def test_extension_out_variant():
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    out = torch.full((6, 5, 4), float("nan"), dtype=torch.bfloat16)
    noise._C.grouped_noise_out(seeds, 3, out)
    torch.testing.assert_close(out, grouped_noise(seeds, 3, (5, 4), dtype=torch.bfloat16), atol=0, rtol=0)


def test_extension_status_keys():
    st = extension_status()
    assert set(st) == {"built", "cuda", "error"}
    assert isinstance(st["built"], bool) and isinstance(st["cuda"], bool)
    assert (st["error"] is None) == st["built"]
    if not st["built"]:
        assert not st["cuda"]


# ---------------------------------------------------------------------------------------------
# (3) determinism, (4) group rows, (5) independence from the batch composition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_deterministic(backend):
    seeds = torch.tensor([10, -20, 2**50], dtype=torch.int64)
    a = grouped_noise(seeds, 4, (3, 17, 5), backend=backend)
    b = grouped_noise(seeds, 4, (3, 17, 5), backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_group_rows_identical_and_prompts_differ(backend):
    seeds = [7, 8, 9]
    G = 5
    out = grouped_noise(seeds, G, (6, 8), backend=backend)
    assert out.shape == (15, 6, 8)
    groups = out.view(3, G, 6, 8)
    for p in range(3):
        for g in range(1, G):
            assert torch.equal(groups[p, g], groups[p, 0])
    assert not torch.equal(groups[0, 0], groups[1, 0])
    assert not torch.equal(groups[1, 0], groups[2, 0])
    # rows are real copies, not views of one row
    assert out.is_contiguous() and out.stride(0) == 48
    out[0].zero_()
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_independent_of_batch_composition(backend):
    s = 424242
    shape = (2, 33)
    alone = grouped_noise([s], 2, shape, backend=backend)[0]
    first = grouped_noise([s, 1, 2, 3], 3, shape, backend=backend)[0]
    last = grouped_noise([5, 6, s], 1, shape, backend=backend)[2]
    middle = grouped_noise(torch.tensor([9, s, 11, 12, 13], dtype=torch.int64), 4, shape, backend=backend)[4]
    for x in (first, last, middle):
        assert torch.equal(x, alone)
    # and the same across backends up to float32 rounding
    torch.testing.assert_close(alone, grouped_noise([s], 1, shape, backend="torch")[0], atol=ATOL, rtol=RTOL)


def test_seed_input_forms_agree():
    ref = grouped_noise(torch.tensor([3, -4], dtype=torch.int64), 2, (10,))
    assert torch.equal(grouped_noise([3, -4], 2, (10,)), ref)
    assert torch.equal(grouped_noise((3, -4), 2, (10,)), ref)
    assert torch.equal(grouped_noise(torch.tensor([3, -4], dtype=torch.int32), 2, (10,)), ref)
    if hasattr(torch, "uint64"):  # bits reinterpreted: 2**64 - 4 is -4
        u = torch.tensor([3, -4], dtype=torch.int64).view(torch.uint64)
        assert torch.equal(grouped_noise(u, 2, (10,)), ref)


def test_empty_cases():
    assert grouped_noise([], 3, (4, 5)).shape == (0, 4, 5)
    assert grouped_noise([1, 2], 3, (4, 0)).shape == (6, 4, 0)
    out = grouped_noise([1, 2], 3, ())
    assert out.shape == (6,)
    assert torch.equal(out[:3], out[0].expand(3))


# ---------------------------------------------------------------------------------------------
# (6) statistics
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_sample():
    seeds = [2024, -2024, 2**40 + 17, 99]
    return grouped_noise(seeds, 1, (250_000,)).double()  # (4, 250000): 1e6 samples


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_mean_and_variance(big_sample):
    x = big_sample.flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 6.0 / math.sqrt(n)
    assert abs(x.var().item() - 1.0) < 6.0 * math.sqrt(2.0 / n)
    # per seed too
    for row in big_sample:
        m = row.numel()
        assert abs(row.mean().item()) < 6.0 / math.sqrt(m)
        assert abs(row.var().item() - 1.0) < 6.0 * math.sqrt(2.0 / m)
    # third and fourth moments (skewness 0, kurtosis 3)
    assert abs((x**3).mean().item()) < 6.0 * math.sqrt(15.0 / n)
    assert abs((x**4).mean().item() - 3.0) < 6.0 * math.sqrt(96.0 / n)


def test_kolmogorov_smirnov_normal(big_sample):
    x, _ = torch.sort(big_sample.flatten())
    n = x.numel()
    cdf = _phi(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    # scalar math.erf agrees with the vectorised erf at a few points
    for v in (-2.0, -0.3, 0.0, 1.7):
        assert abs(0.5 * (1 + math.erf(v / math.sqrt(2))) - _phi(torch.tensor(v, dtype=torch.float64)).item()) < 1e-12
    # critical value at alpha = 1e-3 is 1.95 / sqrt(n)
    assert d < 1.95 / math.sqrt(n), d


def test_quantiles_and_tails(big_sample):
    x = big_sample.flatten()
    n = x.numel()
    for q in (-3.0, -1.959964, -1.0, 0.0, 0.5, 1.644854, 2.575829, 3.5):
        p = 0.5 * (1.0 + math.erf(q / math.sqrt(2.0)))
        frac = (x < q).double().mean().item()
        assert abs(frac - p) < 6.0 * math.sqrt(p * (1 - p) / n) + 1e-6, (q, frac, p)
    # Box-Muller with u1 >= 1e-7: |x| <= sqrt(-2 log 1e-7) ~ 5.68
    assert x.abs().max().item() <= 5.7


def test_low_correlations(big_sample):
    n = big_sample.shape[1]
    bound = 6.0 / math.sqrt(n)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(corr(big_sample[i], big_sample[j])) < bound
        row = big_sample[i]
        assert abs(corr(row[:-1], row[1:])) < bound  # adjacent indices
        assert abs(corr(row[:-2], row[2:])) < bound
    # adjacent seeds and consecutive rollout steps
    adj = grouped_noise([1000, 1001], 1, (n,)).double()
    assert abs(corr(adj[0], adj[1])) < bound
    steps = grouped_noise(torch.cat([seed_for_step([1000], k) for k in range(3)]), 1, (n,)).double()
    assert abs(corr(steps[0], steps[1])) < bound
    assert abs(corr(steps[1], steps[2])) < bound


# ---------------------------------------------------------------------------------------------
# (7) dtypes and shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_dtype_cast(dtype, backend):
    seeds = [1, 2]
    ref32 = grouped_noise(seeds, 2, (5, 7), backend=backend)
    out = grouped_noise(seeds, 2, (5, 7), dtype=dtype, backend=backend)
    assert out.dtype == dtype and out.shape == (4, 5, 7)
    assert torch.equal(out, ref32.to(dtype))  # computed in float32, then cast


@pytest.mark.parametrize("shape", [(3, 4, 5), [3, 4, 5], torch.Size([3, 4, 5]), torch.empty(3, 4, 5).shape])
def test_shape_forms(shape):
    out = grouped_noise([17], 2, shape)
    assert out.shape == (2, 3, 4, 5)
    flat = grouped_noise([17], 1, (60,))
    assert torch.equal(out[0].flatten(), flat[0])  # C order


def test_device_forms():
    a = grouped_noise([5], 1, (4,), device="cpu")
    b = grouped_noise([5], 1, (4,), device=torch.device("cpu"))
    assert a.device.type == "cpu" and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# (8) bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(group_size=0), ValueError, "group_size"),
        (dict(group_size=-2), ValueError, "group_size"),
        (dict(group_size=2.0), TypeError, "group_size"),
        (dict(seeds=torch.tensor([[1, 2]])), ValueError, "seeds"),
        (dict(seeds=torch.tensor(3)), ValueError, "seeds"),
        (dict(seeds=torch.tensor([1.0, 2.0])), TypeError, "seeds"),
        (dict(seeds=torch.tensor([True])), TypeError, "seeds"),
        (dict(seeds=5), TypeError, "seeds"),
        (dict(seeds=[1, 2**63]), ValueError, "seeds[1]"),
        (dict(seeds=[-(2**63) - 1]), ValueError, "seeds[0]"),
        (dict(seeds=[1, 2.5]), TypeError, "seeds[1]"),
        (dict(shape=(2, -1)), ValueError, "shape[1]"),
        (dict(shape=(2, 1.5)), TypeError, "shape[1]"),
        (dict(shape=(2**16, 2**16)), ValueError, "shape"),
        (dict(shape="abc"), TypeError, "shape"),
        (dict(dtype=torch.int32), ValueError, "dtype"),
        (dict(dtype="float32"), TypeError, "dtype"),
        (dict(device="mps"), ValueError, "device"),
        (dict(device="not-a-device"), ValueError, "device"),
        (dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, exc, word):
    args = dict(seeds=[1, 2], group_size=2, shape=(3, 3))
    args.update(kwargs)
    with pytest.raises(exc, match=re.escape(word)):
        grouped_noise(**args)


def test_meta_device_gives_shapes_without_values():
    """A dry run of a full-size model (dancegrpo_fast.plan) draws its noise on the meta device:
    the right shape and dtype, no values, at any size (here 2 x 3 x 2**30 elements)."""
    noise = grouped_noise([1, 2], 3, (2**15, 2**15), torch.bfloat16, "meta")
    assert noise.device.type == "meta" and noise.dtype == torch.bfloat16
    assert noise.shape == (6, 2**15, 2**15)


def test_bad_inputs_seed_for_step_and_fallback():
    with pytest.raises(ValueError, match="step"):
        seed_for_step([1], -1)
    with pytest.raises(TypeError, match="step"):
        seed_for_step([1], 1.5)
    with pytest.raises(ValueError, match="numel"):
        philox_normal_torch([1], -1)
    with pytest.raises(ValueError, match="seeds"):
        philox_normal_torch(torch.zeros(2, 2, dtype=torch.int64), 3)


@needs_ext
def test_extension_checks_name_argument():
    C = noise._C
    s = torch.tensor([1, 2], dtype=torch.int64)
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="group_size"):
        C.grouped_noise(s, 0, [3], torch.float32, cpu)
    with pytest.raises(RuntimeError, match="seeds"):
        C.grouped_noise(s.int(), 1, [3], torch.float32, cpu)
    with pytest.raises(RuntimeError, match="seeds"):
        C.grouped_noise(s.view(1, 2), 1, [3], torch.float32, cpu)
    with pytest.raises(RuntimeError, match="shape"):
        C.grouped_noise(s, 1, [3, -1], torch.float32, cpu)
    with pytest.raises(RuntimeError, match="shape"):
        C.grouped_noise(s, 1, [2**16, 2**16], torch.float32, cpu)
    with pytest.raises(RuntimeError, match="dtype"):
        C.grouped_noise(s, 1, [3], torch.int32, cpu)
    with pytest.raises(RuntimeError, match="out"):
        C.grouped_noise_out(s, 2, torch.empty(3, 3))
    if not C.has_cuda():
        with pytest.raises(RuntimeError, match="CUDA"):
            C.grouped_noise(s, 1, [3], torch.float32, torch.device("cuda", 0))


def test_cuda_request_without_cuda_support():
    if EXT["built"] and not EXT["cuda"]:
        with pytest.raises(RuntimeError, match="extension"):
            grouped_noise([1], 1, (3,), device=torch.device("cuda", 0), backend="extension")


# ---------------------------------------------------------------------------------------------
# (9) seed_for_step
# ---------------------------------------------------------------------------------------------
def _splitmix64_ref(x):
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_seed_for_step():
    seeds = torch.tensor([0, 1, -1, 2**62, -(2**63)], dtype=torch.int64)
    per_step = [seed_for_step(seeds, k) for k in range(20)]
    for t in per_step:
        assert t.dtype == torch.int64 and t.shape == (5,) and t.device == seeds.device
    # deterministic
    assert torch.equal(seed_for_step(seeds, 3), per_step[3])
    assert torch.equal(seed_for_step(seeds.tolist(), 3), per_step[3])
    # all (sample, step) seeds distinct, and different from the input seeds
    allv = torch.stack(per_step).flatten().tolist()
    assert len(set(allv)) == len(allv)
    assert not set(allv) & set(seeds.tolist())
    # the documented formula
    for s in seeds.tolist():
        for k in (0, 1, 7):
            z = _splitmix64_ref((s % 2**64) ^ ((0x9E3779B97F4A7C15 * (k + 1)) % 2**64))
            expected = z - 2**64 if z >= 2**63 else z
            assert seed_for_step([s], k).item() == expected
    # SplitMix64 reference value: splitmix64 of state 0 gives 0xE220A8397B1DCDAF
    assert noise.splitmix64(0) == 0xE220A8397B1DCDAF
    # usable as grouped_noise seeds, and the noise differs between steps
    a = grouped_noise(per_step[0], 1, (64,))
    b = grouped_noise(per_step[1], 1, (64,))
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# import without the extension (fallback + one warning)
# ---------------------------------------------------------------------------------------------
def test_import_without_extension(tmp_path):
    # A fresh interpreter in which `dancegrpo_fast._C` cannot be imported (as when it was never
    # built). A meta-path hook is used rather than a copy of the package without the .so because an
    # editable install's finder would still locate the repository's _C.
    code = textwrap.dedent("""
        import sys, warnings

        class _NoExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "dancegrpo_fast._C":
                    raise ImportError("No module named 'dancegrpo_fast._C' (simulated)")
                return None

        sys.meta_path.insert(0, _NoExtension())
        import torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import dancegrpo_fast.noise as nz
        msgs = [str(x.message) for x in w if "dancegrpo_fast._C" in str(x.message)]
        assert len(msgs) == 1, [str(x.message) for x in w]
        assert "pip install --no-build-isolation -e ." in msgs[0] and "fallback" in msgs[0], msgs[0]
        st = nz.extension_status()
        assert st["built"] is False and st["cuda"] is False and "simulated" in st["error"], st
        out = nz.grouped_noise([1, -2], 3, (4, 5), dtype=torch.bfloat16)
        assert out.shape == (6, 4, 5) and out.dtype == torch.bfloat16
        try:
            nz.grouped_noise([1], 1, (3,), backend="extension")
            raise SystemExit("backend='extension' should fail without the extension")
        except RuntimeError as exc:
            assert "pip install --no-build-isolation -e ." in str(exc)
        torch.save(nz.grouped_noise([1, -2], 3, (4, 5)), sys.argv[1])
        print("OK")
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    fallback = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(fallback, grouped_noise([1, -2], 3, (4, 5)), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# (10) CUDA (runs on a GPU machine)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    shape = (3, 37, 41)
    G = 3
    cpu = grouped_noise(seeds, G, shape, backend="torch")
    # PyTorch fallback on CUDA (seeds on CPU or on the GPU)
    t_cuda = grouped_noise(seeds, G, shape, device="cuda", backend="torch")
    assert t_cuda.is_cuda and t_cuda.shape == cpu.shape
    torch.testing.assert_close(t_cuda.cpu(), cpu, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped_noise(seeds.cuda(), G, shape, device="cuda", backend="torch").cpu(), cpu,
                               atol=1e-5, rtol=0)
    # the default backend on CUDA (extension when it has CUDA, else the fallback)
    auto = grouped_noise(seeds, G, shape, device="cuda")
    torch.testing.assert_close(auto.cpu(), cpu, atol=1e-5, rtol=0)
    if EXT["built"]:
        assert EXT["cuda"], "the extension was built without CUDA on a CUDA machine: " + str(EXT)
        for dev_seeds in (seeds, seeds.cuda()):
            ext = grouped_noise(dev_seeds, G, shape, device="cuda", backend="extension")
            assert ext.is_cuda and ext.is_contiguous() and ext.shape == cpu.shape
            torch.testing.assert_close(ext.cpu(), cpu, atol=1e-5, rtol=0)
            g = ext.view(len(SEEDS), G, *shape)
            assert torch.equal(g[:, 1], g[:, 0]) and torch.equal(g[:, 2], g[:, 0])
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            ext = grouped_noise(seeds, G, shape, dtype=dtype, device="cuda", backend="extension")
            assert ext.dtype == dtype
            tol = 1e-5 if dtype == torch.float64 else (1e-2 if dtype == torch.float16 else 4e-2)
            torch.testing.assert_close(ext.cpu().float(), cpu, atol=tol, rtol=0)
        big = grouped_noise([123], 1, (1 << 20,), device="cuda", backend="extension")
        torch.testing.assert_close(big.cpu(), grouped_noise([123], 1, (1 << 20,), backend="torch"), atol=1e-5, rtol=0)
        empty = grouped_noise([], 2, (3,), device="cuda", backend="extension")
        assert empty.shape == (0, 3) and empty.is_cuda
    # compiled Triton tl.randn on the GPU agrees too (when this process compiles Triton kernels)
    if HAVE_TRITON and not TRITON_INTERPRETED:
        n = 5000
        for s in (0, -1, 2**32 + 7):
            out = _run_randn_kernel(s, n, 1024, device="cuda")
            torch.testing.assert_close(out.cpu(), grouped_noise([s], 1, (n,), backend="torch")[0], atol=1e-5, rtol=0)
