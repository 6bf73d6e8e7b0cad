"""sws_kernels file format version 2: fuzzing, crafted files, memory bounds, atomic and concurrent saves,
version-1 compatibility, architecture mismatches, the label / position encodings."""
import json
import os
import random
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib

import pytest
import torch

import sws_kernels as sws
from sws_kernels import io
from sws_kernels import nn as snn

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "io_v1.sws")


def _fixture_model():
    """The model tests/data/io_v1.sws was saved from (by the version-1 writer, commit 203ad8c)."""
    K = 20
    means = torch.stack([torch.linspace(-0.3, 0.3, K), torch.linspace(-5, -3, K)], -1)
    chol = torch.stack([torch.full((K,), -3.0), torch.linspace(-0.1, 0.1, K), torch.full((K,), -2.0)], -1)
    cb = snn.Codebook(K, means=means, chol=chol, rng_id=11)
    labels = (torch.arange(24) * 7 % K).view(4, 6)
    ell = (torch.tensor([3, 17]), torch.tensor([1, 19]), torch.tensor([7, 0]), torch.tensor([0.25, 0.75]))
    outl = (torch.tensor([5, 22, 9]), torch.tensor([0.5, -0.4, 0.125]), torch.tensor([-3.0, -4.0, -3.5]))
    l0 = snn.SWSLinear(6, 4, codebook=cb, labels=labels, ellipse=ell, outliers=outl, mode="hierarchical", rng_id=12)
    l2 = snn.MeanFieldLinear(4, 3, 0.0, 0.3, 0.0, -3.0, rng_id=13)
    with torch.no_grad():
        l0.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
        l2.mu_weight.copy_(torch.arange(12.).view(3, 4) / 16)
        l2.rho_weight.copy_(-3 - torch.arange(12.).view(3, 4) / 32)
        l2.mu_bias.copy_(torch.tensor([0.5, 0.25, -0.5]))
        l2.rho_bias.copy_(torch.tensor([-4.0, -4.5, -5.0]))
    l2.prior_weight_mu = torch.arange(12.).view(3, 4) / 64
    return torch.nn.Sequential(l0, torch.nn.ReLU(), l2)


def _plain():
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def _model():
    """The fixture model plus a BatchNorm (plain state) and unsorted ellipse positions (zdelta)."""
    m = _fixture_model()
    ell = (torch.tensor([17, 3]), torch.tensor([19, 1]), torch.tensor([0, 7]), torch.tensor([0.75, 0.25]))
    m[0].ellipse_pos, m[0].ellipse_a, m[0].ellipse_b, m[0].ellipse_alpha = (
        ell[0], ell[1].to(torch.uint8), ell[2].to(torch.uint8), ell[3])
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    m.append(bn)
    return m


def _plain_bn():
    return torch.nn.Sequential(*_plain(), torch.nn.BatchNorm1d(3))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return False
    if not all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa):
        return False
    for x, y in zip(a.modules(), b.modules()):
        if type(x) is not type(y):
            return False
        if isinstance(x, snn.SWS_LAYERS) and (x.mode != y.mode or x.codebook.num_components != y.codebook.num_components):
            return False
        if isinstance(x, snn.MEAN_FIELD_LAYERS):
            if (x.prior_mean, x.prior_variance, x.dnn_to_bnn_flag) != (y.prior_mean, y.prior_variance, y.dnn_to_bnn_flag):
                return False
            for p in ("prior_weight_mu", "prior_weight_sigma", "prior_bias_mu", "prior_bias_sigma"):
                if not torch.equal(getattr(x, p), getattr(y, p)):
                    return False
    return True


def _split(blob: bytes):
    _, hlen, dlen = struct.unpack_from("<8sIQ", blob)
    return json.loads(blob[20:20 + hlen]), blob[20 + hlen:20 + hlen + dlen]


def _frame(hdr, data: bytes, magic=io.MAGIC) -> bytes:
    hb = json.dumps(hdr).encode()
    body = struct.pack("<8sIQ", magic, len(hb), len(data)) + hb + bytes(data)
    return body + struct.pack("<I", zlib.crc32(body))


def _outcome(path, model_fn):
    """'error' (ValueError), 'same' (exactly the saved state) or 'different'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = sws.load(path, model_fn())
    except ValueError:
        return "error", None
    return ("same" if _same(got, _model()) else "different"), got


# ---------------------------------------------------------------------------------------------------------
# encodings
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 2, 3, 20, 255, 256, 257, 300, 4096, 4097, 40000])
def test_label_bits_round_trip(K, rng):
    bits = io.label_bits(K)
    assert bits == max(1, (K - 1).bit_length()) and (K > 4096 or bits <= 12)
    for n in (0, 1, 7, 8, 9, 1001):
        v = torch.randint(0, K, (n,), generator=rng).to(snn.label_dtype(K))
        raw = io._pack_bits(v, bits)
        assert len(raw) == (n * bits + 7) // 8
        back = io._unpack_bits(torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else
                               torch.zeros(0, dtype=torch.uint8), n, bits, v.dtype, "t")
        assert back.dtype == v.dtype and torch.equal(back, v)


def test_varint_positions_round_trip(rng):
    cases = [torch.zeros(0, dtype=torch.int64), torch.tensor([0]), torch.tensor([5, 5, 6, 200, 20000]),
             torch.sort(torch.randperm(10**6, generator=rng)[:3000]).values,
             torch.randperm(10**6, generator=rng)[:3000],
             torch.tensor([2**63 - 1, 0, -2**63, 17, -1])]
    for p in cases:
        enc, raw = io._varint_encode(p)
        assert enc == ("delta" if bool((torch.diff(p, prepend=torch.zeros(1, dtype=torch.int64)) >= 0).all())
                       else "zdelta")
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        assert torch.equal(io._varint_decode(t, p.numel(), enc == "zdelta", "t"), p)
    sorted_pos = cases[3]
    assert len(io._varint_encode(sorted_pos)[1]) < 2 * sorted_pos.numel()  # gaps ~333: 2 bytes or less each
    with pytest.raises(ValueError, match="exactly"):
        io._varint_decode(torch.tensor([0x80, 0x01, 0x80], dtype=torch.uint8), 1, False, "t")
    with pytest.raises(ValueError, match="64 bits"):
        io._varint_decode(torch.tensor([0xFF] * 10 + [0x01], dtype=torch.uint8), 1, False, "t")


# ---------------------------------------------------------------------------------------------------------
# compatibility and architecture
# ---------------------------------------------------------------------------------------------------------

def test_version1_fixture_loads_with_a_warning():
    with pytest.warns(io.FormatWarning, match="version-1"):
        got = sws.load(FIXTURE, _plain())
    want = _fixture_model()
    assert _same(got, want)
    assert got[0].codebook.num_components == 20 and got[0].mode == "hierarchical"
    x = torch.randn(3, 6)
    torch.testing.assert_close(sws.predict(got, x, 2, seed=3), sws.predict(want, x, 2, seed=3), rtol=0, atol=0)
    with pytest.warns(io.FormatWarning):
        sd = sws.load(FIXTURE)
    assert torch.equal(sd["0.labels"], want[0].labels)


def test_version2_round_trip_and_sizes(tmp_path):
    m = _model()
    f = tmp_path / "m.sws"
    n = sws.save(m, f)
    assert n == f.stat().st_size == io.size_report(m)["disk"]["total"]
    hdr, _ = _split(f.read_bytes())
    enc = {e["key"]: (e.get("encoding"), e.get("bits")) for e in hdr["tensors"]}
    assert enc["0.labels"] == ("bits", 5) and enc["0.ellipse_a"] == ("bits", 5)
    assert enc["0.ellipse_pos"] == ("zdelta", None) and enc["0.outlier_pos"] == ("zdelta", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FormatWarning for version 2
        got = sws.load(f, _plain_bn())
    assert _same(got, m)


def test_architecture_mismatch_needs_rebuild(tmp_path):
    m = _model()
    f = tmp_path / "m.sws"
    sws.save(m, f)
    wrong = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)),
             torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(4, 3),
                                 torch.nn.BatchNorm1d(3)),
             torch.nn.Sequential(torch.nn.Conv1d(6, 4, 1), torch.nn.ReLU(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)),
             torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), snn.MeanFieldLinear(3, 3), torch.nn.BatchNorm1d(3))]
    for arch in wrong:
        with pytest.raises(ValueError, match="rebuild=True"):
            sws.load(f, arch)
        assert type(arch[0]) in (torch.nn.Linear, torch.nn.Conv1d)  # unchanged by the failed load
        assert _same(sws.load(f, arch, rebuild=True), m)
    # counterparts of the same architecture are replaced; the same class is loaded in place
    for arch in (_plain_bn(), torch.nn.Sequential(snn.MeanFieldLinear(6, 4), torch.nn.ReLU(), snn.SWSLinear(
            4, 3, codebook=snn.Codebook(4)), torch.nn.BatchNorm1d(3))):
        assert _same(sws.load(f, arch), m)
    same = _model()
    same[0].mode = "paper"
    layer, cb = same[0], same[0].codebook
    got = sws.load(f, same)
    assert got[0] is layer and got[0].codebook is cb and got[0].mode == "hierarchical" and _same(got, m)
    # plain tensors must match the model exactly
    bn64 = _plain_bn().double()
    with pytest.raises(ValueError, match="3.weight.*float64.*float32"):
        sws.load(f, bn64)
    with pytest.raises(ValueError, match="bare SWSLinear"):
        g = tmp_path / "bare.sws"
        sws.save(m[0], g)
        sws.load(g, torch.nn.Linear(6, 4))


# ---------------------------------------------------------------------------------------------------------
# fuzzing
# ---------------------------------------------------------------------------------------------------------

def _structural_edits(hdr, data, r: random.Random):
    """(name, header, data) variants that break the schema; each must be rejected even with a valid checksum."""
    out = []
    ents = hdr["tensors"]
    stored = [i for i, e in enumerate(ents) if "offsets" in e]

    def copy():
        return json.loads(json.dumps(hdr))

    def find(key):
        return next(i for i, e in enumerate(ents) if e["key"] == key)

    same_size = {"float32": "int32", "int32": "float32", "int64": "float64", "float64": "int64", "uint8": "int8",
                 "int8": "uint8", "int16": "float16", "float16": "bfloat16", "bfloat16": "int16"}
    for i in stored:
        if ents[i]["dtype"] in same_size and not ents[i]["key"].startswith("3."):
            h = copy()
            h["tensors"][i]["dtype"] = same_size[ents[i]["dtype"]]
            out.append((f"dtype {ents[i]['key']}", h, data))
    for i, j in zip(stored, stored[1:]):  # swapped offsets of neighbours
        h = copy()
        a, b = h["tensors"][i], h["tensors"][j]
        a["offsets"], b["offsets"] = b["offsets"], a["offsets"]
        out.append((f"swap {a['key']}/{b['key']}", h, data))
    h = copy()
    e = h["tensors"][find("0.labels")]
    e["shape"] = e["shape"][::-1]
    out.append(("transposed labels", h, data))
    for key in ("0.rng_id", "0.codebook.rng_id", "2.rng_id", "0.labels", "0.outlier_mu0", "3.running_mean"):
        h = copy()
        i = find(key)
        e = h["tensors"].pop(i)
        d = bytearray(data)
        if "offsets" in e:
            b0, b1 = e["offsets"]
            del d[b0:b1]
            for f in h["tensors"][i:]:
                if "offsets" in f:
                    f["offsets"] = [f["offsets"][0] - (b1 - b0), f["offsets"][1] - (b1 - b0)]
        out.append((f"removed {key}", h, bytes(d)))
    for i in r.sample(range(len(ents)), 6):  # renamed keys
        for new in ("labelz", "__class__", "__dict__", "0", "forward", "running_mean"):
            h = copy()
            k = h["tensors"][i]["key"]
            h["tensors"][i]["key"] = k.rpartition(".")[0] + "." + new if "." in k else new
            out.append((f"rename {k}->{new}", h, data))
    for path in ("0.__class__", "__prior__", "0.forward", "1", "0.codebook.__class__", "5", "2.x"):
        h = copy()
        h["modules"][path] = h["modules"]["2"]
        out.append((f"module path {path}", h, data))
    for path, key, val in (("0", "in_features", 7), ("0", "out_features", 20000), ("0", "bias", False),
                           ("0", "mode", "fast"), ("0", "codebook", "2"), ("0.codebook", "num_components", 21),
                           ("2", "prior_variance", -0.3), ("2", "prior_mean", "0"), ("2", "bias", 1),
                           ("2", "extra", 1), ("0", "in_features", True)):
        h = copy()
        h["modules"][path]["config"][key] = val
        out.append((f"config {path}.{key}={val!r}", h, data))
    for path in ("0", "2"):
        h = copy()
        h["modules"][path]["class"] = "SWSConv1d" if path == "0" else "Sequential"
        out.append((f"class {path}", h, data))
    h = copy()
    h["extra"] = 1
    out.append(("unknown header key", h, data))
    h = copy()
    h["tensors"][find("0.labels")]["bits"] = 6
    out.append(("labels bits", h, data))
    h = copy()
    h["tensors"][find("0.labels")]["encoding"] = "raw"
    out.append(("labels raw", h, data))
    h = copy()
    h["tensors"][find("2.prior_weight_mu")]["shape"] = [4, 3]
    out.append(("prior shape", h, data))
    h = copy()
    h["tensors"][find("2.prior_weight_mu")]["key"] = "2.prior_weight_rho"
    out.append(("prior name", h, data))
    h = copy()
    h["tensors"][find("0.codebook.means")] = {"key": "0.codebook.means", "alias": "2.mu_weight"}
    out.append(("alias", h, data))
    return out


def test_fuzz_flips_truncations_and_schema_edits(tmp_path):
    r = random.Random(1234)
    m = _model()
    f = tmp_path / "m.sws"
    sws.save(m, f)
    blob = f.read_bytes()
    hdr, data = _split(blob)
    bad = tmp_path / "bad.sws"
    assert _outcome(f, _plain_bn)[0] == "same"
    counts = {"error": 0, "same": 0}
    # 1. bit flips anywhere and truncations: the whole-file checksum rejects every one
    for _ in range(200):
        b = bytearray(blob)
        i = r.randrange(len(b))
        b[i] ^= 1 << r.randrange(8)
        bad.write_bytes(bytes(b))
        out, _ = _outcome(bad, _plain_bn)
        assert out in ("error", "same"), f"flip at byte {i}"
        counts[out] += 1
    for _ in range(60):
        bad.write_bytes(blob[:r.randrange(len(blob))])
        assert _outcome(bad, _plain_bn)[0] == "error"
    assert counts["same"] == 0
    # 2. schema edits: without the checksum updated, and with it (a crafted file) -> always ValueError
    edits = _structural_edits(hdr, data, r)
    assert len(edits) > 60
    for what, h, d in edits:
        framed = _frame(h, d)
        bad.write_bytes(framed[:-4] + struct.pack("<I", zlib.crc32(blob[:-4])))
        assert _outcome(bad, _plain_bn)[0] == "error", what
        bad.write_bytes(framed)
        out, got = _outcome(bad, _plain_bn)
        assert out == "error", f"{what}: loaded {out} state"
        if " 3." not in what and "->" not in what and "removed 3." not in what:
            with pytest.raises(ValueError):
                sws.load(bad)  # without a model too (plain keys are checked against a model only)
    # 3. edits that make another valid file: rejected unless the checksum is updated, then loaded as written
    for path, key, val, check in (("0", "mode", "mean", lambda g: g[0].mode == "mean"),
                                  ("2", "prior_variance", 2.3, lambda g: g[2].prior_variance == 2.3 and abs(float(g[2].prior_weight_sigma) - 2.3) < 1e-6),
                                  ("2", "dnn_to_bnn_flag", True, lambda g: g[2].dnn_to_bnn_flag)):
        h = json.loads(json.dumps(hdr))
        h["modules"][path]["config"][key] = val
        framed = _frame(h, data)
        bad.write_bytes(framed[:-4] + blob[-4:])
        assert _outcome(bad, _plain_bn)[0] == "error"
        bad.write_bytes(framed)
        out, got = _outcome(bad, _plain_bn)
        assert out == "different" and check(got), key
    # a removed non-scalar prior is a file of a layer with the scalar prior
    h = json.loads(json.dumps(hdr))
    e = h["tensors"].pop(next(i for i, e in enumerate(h["tensors"]) if e["key"] == "2.prior_weight_mu"))
    assert e["offsets"][1] == len(data)  # priors come last
    bad.write_bytes(_frame(h, data[:e["offsets"][0]]))
    out, got = _outcome(bad, _plain_bn)
    assert out == "different" and got[2].prior_weight_mu.dim() == 0 and float(got[2].prior_weight_mu) == 0.0


def test_corrupted_values_are_rejected_with_valid_checksum(tmp_path):
    """Data that passes the schema but not the entry checks (crafted: checksum recomputed)."""
    m = _model()
    f = tmp_path / "m.sws"
    sws.save(m, f)
    hdr, data = _split(f.read_bytes())
    bad = tmp_path / "bad.sws"

    def patched(key, values):
        h = json.loads(json.dumps(hdr))
        d = bytearray(data)
        i = next(i for i, e in enumerate(h["tensors"]) if e["key"] == key)
        e = h["tensors"][i]
        b0, b1 = e["offsets"]
        t = torch.tensor(values, dtype=getattr(torch, e["dtype"])).reshape(e["shape"])
        if e["encoding"] == "bits":
            raw = io._pack_bits(t, e["bits"])
        elif e["encoding"] in ("delta", "zdelta"):
            e["encoding"], raw = io._varint_encode(t)
        else:
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        d[b0:b1] = raw
        shift = len(raw) - (b1 - b0)
        e["offsets"] = [b0, b0 + len(raw)]
        for g in h["tensors"][i + 1:]:
            if "offsets" in g:
                g["offsets"] = [g["offsets"][0] + shift, g["offsets"][1] + shift]
        return _frame(h, bytes(d))

    cases = {"0.labels": ([[0, 1, 2, 3, 4, 31]] + [[0] * 6] * 3, "labels"),
             "0.outlier_pos": ([5, 22, 10**9], "outlier positions"),
             "0.ellipse_pos": ([17, -1], "ellipse positions"),
             "0.ellipse_alpha": ([0.75, 1.5], "alpha"),
             "0.ellipse_a": ([25, 1], "comp_a"),
             "0.outlier_sigma0": ([1.0, 0.0, 1.0], "positive"),
             "0.rng_id": (2**40, "rng_id"),
             "0.codebook.chol": ([[float("nan"), 0, 0]] * 20, "chol"),
             "2.rho_weight": ([[float("inf")] * 4] * 3, "rho"),
             "2.prior_weight_mu": ([[float("nan")] * 4] * 3, "prior_weight_mu")}
    for key, (vals, word) in cases.items():
        bad.write_bytes(patched(key, vals))
        model = _plain_bn()
        with pytest.raises(ValueError, match=word):
            sws.load(bad, model)
        assert type(model[0]) is torch.nn.Linear  # the model is untouched
    # duplicate positions across ellipses and outliers
    bad.write_bytes(patched("0.outlier_pos", [5, 22, 17]))
    with pytest.raises(ValueError, match="at most once"):
        sws.load(bad, _plain_bn())


# ---------------------------------------------------------------------------------------------------------
# crafted files in a subprocess: nothing outside the model changes, memory stays bounded
# ---------------------------------------------------------------------------------------------------------

def _run(code: str, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _v1_file(tensors: dict, modules: dict) -> bytes:
    """A version-1 file (the old writer's layout) holding float32 ``tensors``."""
    entries, data = {}, b""
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        entries[k] = {"dtype": "float32", "shape": list(t.shape), "offsets": [len(data), len(data) + len(raw)]}
        data += raw
    hdr = {"format": "sws_kernels", "version": 1, "torch": "x", "tensors": entries, "modules": modules,
           "data_size": len(data), "data_crc32": zlib.crc32(data)}
    hb = json.dumps(hdr).encode()
    return io.MAGIC_V1 + struct.pack("<Q", len(hb)) + hb + data


def test_crafted_class_paths_change_nothing(tmp_path):
    files = []
    # the 202-byte file: a prior key walking into nn.Sequential's class (version 1) ...
    p = tmp_path / "prior_v1.sws"
    p.write_bytes(_v1_file({"__prior__.__class__.forward": torch.zeros(1)}, {}))
    files.append(p)
    # ... and as version-2 tensor keys / module paths
    m = _model()
    f = tmp_path / "m.sws"
    sws.save(m, f)
    hdr, data = _split(f.read_bytes())
    for key in ("__prior__.__class__.forward", "0.__class__", "1.__class__.__call__", "0.__dict__"):
        h = json.loads(json.dumps(hdr))
        h["tensors"].append({"key": key, "dtype": "float32", "shape": [1], "offsets": [len(data), len(data) + 4],
                             "encoding": "raw"})
        p = tmp_path / f"key{len(files)}.sws"
        p.write_bytes(_frame(h, data + bytes(4)))
        files.append(p)
    for path in ("0.__class__", "__class__", "1.forward", "0.training", "2.__class__.forward"):
        h = json.loads(json.dumps(hdr))
        h["modules"][path] = h["modules"]["2"]
        p = tmp_path / f"mod{len(files)}.sws"
        p.write_bytes(_frame(h, data))
        files.append(p)
    out = _run(f"""
        import torch, sws_kernels as sws
        files = {[str(p) for p in files]!r}
        for f in files:
            model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3),
                                        torch.nn.BatchNorm1d(3))
            try:
                sws.load(f, model)
            except ValueError as e:
                print("ValueError", f)
            else:
                print("LOADED", f)
            assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "BatchNorm1d"], model
            assert type(model).forward is torch.nn.Sequential.forward
            y = torch.nn.Sequential(torch.nn.Linear(2, 2))(torch.randn(1, 2))  # every Sequential still works
            assert y.shape == (1, 2) and type(model[0]) is torch.nn.Linear and model[0].training
        print("DONE")
    """)
    assert out.count("ValueError") == len(files) and "LOADED" not in out and "DONE" in out


def test_size_amplification_file_is_rejected_in_bounded_memory(tmp_path):
    # version 2: a 5 KB file declaring SWS and mean-field layers of 20000 x 20000
    m = _model()
    f = tmp_path / "m.sws"
    sws.save(m, f)
    hdr, data = _split(f.read_bytes())
    crafted = []
    h = json.loads(json.dumps(hdr))
    for path in ("0", "2"):
        h["modules"][path]["config"].update(in_features=20000, out_features=20000)
    for e in h["tensors"]:
        if e["key"] in ("0.labels", "2.mu_weight", "2.rho_weight", "2.prior_weight_mu"):
            e["shape"] = [20000, 20000]
    crafted.append(_frame(h, data + bytes(1000)))
    h2 = json.loads(json.dumps(h))
    for e in h2["tensors"]:  # also lie about the byte counts (each entry consistent, the total not)
        if e["key"] == "2.mu_weight":
            e["offsets"] = [e["offsets"][0], e["offsets"][0] + 20000 * 20000 * 4]
    crafted.append(_frame(h2, data))
    # version 1: the old exploit (tiny tensors, a huge config)
    crafted.append(_v1_file({"0.mu_weight": torch.zeros(1)}, {"0": {"class": "MeanFieldLinear", "config": {
        "in_features": 20000, "out_features": 20000, "bias": True, "prior_mean": 0.0, "prior_variance": 1.0,
        "posterior_mu_init": 0.0, "posterior_rho_init": -3.0, "dnn_to_bnn_flag": False}}}))
    paths = []
    for i, b in enumerate(crafted):
        p = tmp_path / f"amp{i}.sws"
        p.write_bytes(b)
        assert p.stat().st_size < 10_000
        paths.append(str(p))
    out = _run(f"""
        import resource, warnings, torch, sws_kernels as sws
        warnings.simplefilter("ignore")
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        limit = vm + (1 << 30)  # 1 GiB above what the process maps now: a 1.6 GB allocation fails
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            torch.empty(20000, 20000)
            print("LIMIT NOT EFFECTIVE")
        except (RuntimeError, MemoryError):
            pass
        for f in {paths!r}:
            for model in (None, torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))):
                try:
                    sws.load(f, model)
                except ValueError as e:
                    print("ValueError", str(e)[:150])
        print("DONE")
    """)
    assert "LIMIT NOT EFFECTIVE" not in out
    assert out.count("ValueError") == 2 * len(paths) and "DONE" in out, out


# ---------------------------------------------------------------------------------------------------------
# save: atomic, durable, permissions, concurrency
# ---------------------------------------------------------------------------------------------------------

def _variant(i: int):
    m = _model()
    with torch.no_grad():
        m[0].bias.fill_(float(i))
    return m


def _leftovers(d):
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_save_keeps_permissions_and_cleans_up(tmp_path, monkeypatch):
    f = tmp_path / "m.sws"
    sws.save(_variant(0), f)
    umask = os.umask(0o22)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    os.chmod(f, 0o600)
    sws.save(_variant(1), f)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    before = f.read_bytes()

    def boom(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        sws.save(_variant(2), f)
    monkeypatch.undo()
    assert f.read_bytes() == before and _leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        sws.save(_variant(2), tmp_path / "no_such_dir" / "m.sws") if False else sws.save("x", f)
    with pytest.raises(FileNotFoundError):
        sws.save(_variant(2), tmp_path / "no_such_dir" / "m.sws")
    assert _leftovers(tmp_path) == []


def test_concurrent_saves_threads_and_processes(tmp_path):
    f = tmp_path / "m.sws"
    models = [_variant(i) for i in range(6)]
    errors = []

    def work(i):
        try:
            for _ in range(8):
                sws.save(models[i], f)
        except Exception as e:  # noqa: BLE001 - any failure fails the test below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = sws.load(f, _plain_bn())
    assert any(_same(got, m) for m in models) and _leftovers(tmp_path) == []
    # two processes
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import sws_kernels as sws
        from test_io_format import _variant
        m = _variant(int(sys.argv[1]))
        for _ in range(10):
            sws.save(m, {str(f)!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in (10, 11)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    got = sws.load(f, _plain_bn())
    assert _same(got, _variant(10)) or _same(got, _variant(11))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cls", [*snn.SWS_LAYERS, *snn.MEAN_FIELD_LAYERS], ids=lambda c: c.__name__)
def test_every_layer_class_round_trips_into_its_torch_counterpart(cls, tmp_path):
    """io's class table follows nn's layer tuples: each class saves, replaces the torch layer of the same
    architecture, and is refused (without rebuild=True) where the sizes differ."""
    nd = getattr(cls, "_spatial", None)
    transposed = "Transpose" in cls.__name__
    kw = {"codebook": snn.Codebook(20)} if cls in snn.SWS_LAYERS else {}
    if nd is None:
        layer, plain, other = cls(6, 4, **kw), torch.nn.Linear(6, 4), torch.nn.Linear(6, 5)
    else:
        tcls = getattr(torch.nn, f"Conv{'Transpose' if transposed else ''}{nd}d")
        layer, plain, other = cls(4, 6, 3, stride=2, **kw), tcls(4, 6, 3, stride=2), tcls(4, 6, 3, stride=1)
    f = tmp_path / "l.sws"
    sws.save(torch.nn.Sequential(layer), f)
    got = sws.load(f, torch.nn.Sequential(plain))
    assert type(got[0]) is cls and _same(got, torch.nn.Sequential(layer))
    with pytest.raises(ValueError, match="rebuild=True"):
        sws.load(f, torch.nn.Sequential(other))
    assert type(sws.load(f, torch.nn.Sequential(other), rebuild=True)[0]) is cls
