"""The RNG contract (SPEC.md section 4): PyTorch, Triton and native C++ draw the same stream."""
import math

import pytest
import torch

from sws_kernels import native, philox

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _triton():
    return pytest.importorskip("sws_kernels.triton.philox", reason="triton not importable")


needs_native = pytest.mark.skipif(not native.AVAILABLE_CPU, reason=f"native CPU module: {native.CPU_REASON}")


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_torch(counter, key, expected):
    out = philox.philox4x32(torch.tensor(counter), torch.tensor(key))
    assert out.tolist() == list(expected)


def test_known_answers_triton():
    T = _triton()
    c = torch.tensor([k[0] for k in KAT])
    k = torch.tensor([k[1] for k in KAT])
    assert T.philox_words(c, k).tolist() == [list(k[2]) for k in KAT]


@needs_native
def test_known_answers_native():
    c = torch.tensor([k[0] for k in KAT])
    k = torch.tensor([k[1] for k in KAT])
    assert native.philox4x32(c, k).tolist() == [list(k[2]) for k in KAT]


def test_words_agree_on_random_counters(rng):
    c = torch.randint(0, 2**32, (2000, 4), generator=rng)
    k = torch.randint(0, 2**32, (2000, 2), generator=rng)
    ref = philox.philox4x32(c, k)
    assert ref.min() >= 0 and ref.max() < 2**32
    assert torch.equal(_triton().philox_words(c, k), ref)
    if native.AVAILABLE_CPU:
        assert torch.equal(native.philox4x32(c, k), ref)


def test_broadcasting_counter_and_key():
    c = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    k = torch.tensor([9, 10])
    both = philox.philox4x32(c, k)
    assert torch.equal(both[1], philox.philox4x32(c[1], k))


def test_uniform_definition():
    """u = float32(2 * (w >> 9) + 1) * 2^-24 on word i % 4 of counter (i // 4, s, owner, purpose)."""
    seed, s, owner, purpose = 0x1234_5678_9ABC_DEF0, 3, 17, 2
    u = philox.uniform(seed, 11, sample=s, owner=owner, purpose=purpose)
    for i in range(11):
        w = philox.philox4x32(torch.tensor([i // 4, s, owner, purpose]),
                              torch.tensor([seed & 0xFFFFFFFF, seed >> 32]))[i % 4].item()
        assert u[i].item() == (2 * (w >> 9) + 1) * 2.0**-24
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()


def test_normal_is_box_muller_of_the_uniforms():
    seed = 99
    u = philox.uniform(seed, 8).double()
    z = philox.normal(seed, 8).double()
    for j in range(2):
        u0, u1, u2, u3 = u[4 * j: 4 * j + 4].tolist()
        r01, r23 = math.sqrt(-2 * math.log(u0)), math.sqrt(-2 * math.log(u2))
        want = [r01 * math.cos(2 * math.pi * u1), r01 * math.sin(2 * math.pi * u1),
                r23 * math.cos(2 * math.pi * u3), r23 * math.sin(2 * math.pi * u3)]
        assert torch.allclose(z[4 * j: 4 * j + 4], torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [0, 1, 3, 2**32 - 2, 2**32 + 5, 4 * 2**30 + 7, 2**34 - 37])
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 1, 2**64 - 1])
def test_streams_agree_across_backends(seed, offset):
    """Uniforms bit-exact, normals within 1e-5; element indices past 2**32 (j >= 2**30); 64-bit seeds."""
    n = 37
    kw = dict(sample=2**32 - 1 if seed == 7 else 5, owner=123456, purpose=1)
    u = philox.uniform(seed, n, offset=offset, **kw)
    z = philox.normal(seed, n, offset=offset, **kw)
    # the window agrees with the same elements of a stream read from its start
    if offset < 64:
        assert torch.equal(philox.uniform(seed, offset + n, **kw)[offset:], u)
    T = _triton()
    assert torch.equal(T.uniform(seed, n, offset=offset, **kw).cpu(), u)
    assert (T.normal(seed, n, offset=offset, **kw).cpu() - z).abs().max() <= 1e-5
    if native.AVAILABLE_CPU:
        assert torch.equal(native.uniform(seed, n, offset=offset, **kw), u)
        assert (native.normal(seed, n, offset=offset, **kw) - z).abs().max() <= 1e-5


def test_normal_at_matches_stream(rng):
    idx = torch.randint(0, 1000, (50,), generator=rng)
    full = philox.normal(5, 1000, sample=2, owner=3)
    assert torch.equal(philox.normal_at(5, idx, sample=2, owner=3), full[idx])


def test_seed_split_uses_both_words():
    a = philox.uniform(1, 8)
    b = philox.uniform(1 + 2**32, 8)
    assert not torch.equal(a, b)


def test_tensor_seed_carries_uint64_bits():
    seed = 2**64 - 5
    t = torch.tensor(seed - 2**64, dtype=torch.int64)
    assert torch.equal(philox.uniform(t, 9), philox.uniform(seed, 9))


def test_streams_differ_by_sample_owner_purpose():
    base = philox.uniform(3, 16)
    for kw in (dict(sample=1), dict(owner=1), dict(purpose=1)):
        assert not torch.equal(philox.uniform(3, 16, **kw), base)


def test_moments_of_many_normals():
    z = philox.normal(2024, 2_000_000, owner=9).double()
    n = z.numel()
    # standard errors: mean 1/sqrt(n), var sqrt(2/n); allow 5 sigma
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z**3).mean()).item()) < 5 * math.sqrt(15 / n)
    assert abs(((z**4).mean()).item() - 3) < 5 * math.sqrt(96 / n)
    u = philox.uniform(2024, 1_000_000).double()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())


@pytest.mark.parametrize("bad,err", [
    (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError), (dict(seed=1.5), TypeError),
    (dict(n=-1), ValueError), (dict(offset=2**34 - 3, n=4), ValueError), (dict(sample=2**32), ValueError),
    (dict(owner=-1), ValueError), (dict(purpose=2**32), ValueError),
])
def test_stream_limits_raise(bad, err):
    kw = dict(seed=1, n=4)
    kw.update(bad)
    seed, n = kw.pop("seed"), kw.pop("n")
    with pytest.raises(err) as e:
        philox.uniform(seed, n, **kw)
    name = next(iter(bad))
    assert name in str(e.value) or "element index" in str(e.value)


def test_last_allowed_element():
    v = philox.uniform(1, 1, offset=2**34 - 1)
    assert v.shape == (1,)


def test_counter_key_errors():
    with pytest.raises(TypeError, match="counter"):
        philox.philox4x32(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="key"):
        philox.philox4x32(torch.zeros(4, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="counter"):
        philox.philox4x32(torch.tensor([2**32, 0, 0, 0]), torch.zeros(2, dtype=torch.int64))


@needs_native
def test_native_limits_raise():
    with pytest.raises(ValueError):
        native.uniform(1, 4, offset=2**34 - 3)
    with pytest.raises(ValueError):
        native.normal(2**64, 4)


@pytest.mark.parametrize("offset", [0, 4, 2**32 + 4, 2**34 - 4 * 70])
@pytest.mark.parametrize("seed", [5, 2**31, 2**63 + 2**31 + 3, 2**64 - 1])
def test_normal_rows_matches_stream_normal(seed, offset):
    """normal_rows (one Philox call per four elements, the fused kernels' contiguous path) draws exactly what
    stream_normal (one call per element) draws: the same float ops on the same words, so the same bits; both
    within 1e-5 of the PyTorch stream. Seed words and the sample id past 2**31 travel as i32 bit patterns."""
    T = _triton()
    n = 4 * 70 - 3  # ragged tail: the last [rows, cols] tile is masked
    kw = dict(sample=2**32 - 2, owner=2**31 + 9, purpose=0)
    rows = T.normal_rows_stream(seed, n, offset=offset, rows=2, cols=16, **kw).cpu()
    single = T.normal(seed, n, offset=offset, **kw).cpu()
    assert torch.equal(rows, single)
    assert (rows - philox.normal(seed, n, offset=offset, **kw)).abs().max() <= 1e-5


def test_normal_rows_alignment_error():
    with pytest.raises(ValueError, match="offset, cols: expected multiples of 4"):
        _triton().normal_rows_stream(1, 8, offset=2)


def test_kernel_words_are_i32_and_seed_is_read_from_memory():
    """uint32 kernel arguments (sample, owner, purpose) travel as the int32 with the same bits, so Triton types
    them i32 for any value; the seed travels as a 0-dim int64 tensor the kernels load (no host read), and an
    int seed and the tensor holding its bits draw the same stream."""
    T = _triton()
    for v in (0, 2**31, 2**32 - 1):
        w = T.u32_arg(v)
        assert -2**31 <= w < 2**31 and w & 0xFFFFFFFF == v
    for seed in (0, 2**31, 2**63, 2**64 - 1):
        t = T.seed_arg(seed, "cpu")
        assert t.dtype == torch.int64 and t.dim() == 0 and int(t) & (2**64 - 1) == seed
        assert torch.equal(T.uniform(t, 9, sample=3).cpu(), T.uniform(seed, 9, sample=3).cpu())
        assert torch.equal(T.uniform(seed, 9, sample=3).cpu(), philox.uniform(t, 9, sample=3))
