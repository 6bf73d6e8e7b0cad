"""sws_kernels.save / load / size_report: exact round trips, rebuilt architectures, corrupted files."""
import json
import struct
import zlib

import pytest
import torch

import sws_kernels as sws
from sws_kernels import convert, io
from sws_kernels import nn as snn


def _arch():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 3, bias=False), torch.nn.BatchNorm1d(3))


def _sws_model(rng, K=300):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    model, _ = convert.to_mean_field(_arch(), moped=True, moped_delta=0.2)
    model, rep = convert.to_sws(model, K, progress=False, min_component_size=0)
    model[0].mode = "hierarchical"
    with torch.no_grad():  # train-like drift, so posterior != prior and buffers are not defaults
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=rng))
        model[6].running_mean.normal_(generator=rng)
    return model


def _reframe(hdr, data: bytes) -> bytes:
    """A version-2 file of header ``hdr`` and ``data`` with a valid checksum."""
    hb = json.dumps(hdr).encode()
    body = struct.pack("<8sIQ", io.MAGIC, len(hb), len(data)) + hb + bytes(data)
    return body + struct.pack("<I", zlib.crc32(body))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_rebuilds_sws_layers_into_fresh_architecture(rng, tmp_path):
    model = _sws_model(rng).eval()
    assert model[0].labels.dtype == snn.label_dtype(model[0].codebook.num_components)
    f = tmp_path / "m.sws"
    n = sws.save(model, f)
    assert f.stat().st_size == n
    fresh = sws.load(f, _arch()).eval()  # deterministic architecture in, SWS model out
    assert isinstance(fresh[0], snn.SWSConv2d) and isinstance(fresh[3], snn.SWSLinear)
    assert fresh[0].mode == "hierarchical" and fresh[0].padding_mode == "reflect"
    assert fresh[0].codebook is fresh[3].codebook is fresh[5].codebook  # sharing restored
    _same_state(model, fresh)
    assert fresh[0].owner == model[0].owner and fresh[0].codebook.owner == model[0].codebook.owner
    x = torch.randn(4, 3, 5, 5, generator=rng)
    torch.testing.assert_close(sws.predict(fresh, x, 3, seed=9), sws.predict(model, x, 3, seed=9), rtol=0, atol=0)
    torch.testing.assert_close(sws.kl_loss(fresh), sws.kl_loss(model), rtol=0, atol=0)
    # the shared codebook is stored once
    hdr = io.read_header(f)
    aliases = [e["key"] for e in hdr["tensors"] if "alias" in e]
    assert "3.codebook.means" in aliases and "5.codebook.means" in aliases
    # load without a model: the state_dict
    sd = sws.load(f)
    assert sd["0.labels"].dtype == model[0].labels.dtype and torch.equal(sd["0.labels"], model[0].labels)


def test_round_trip_int16_labels(rng, tmp_path):
    cb = snn.Codebook(300)
    ell = (torch.tensor([3, 50]), torch.tensor([1, 299]), torch.tensor([7, 0]), torch.tensor([0.6, 0.9]))
    outl = (torch.tensor([4, 399]), torch.tensor([0.5, -0.4]), torch.tensor([-3.0, -4.0]))
    model = torch.nn.Sequential(snn.SWSLinear(40, 10, codebook=cb, ellipse=ell, outliers=outl, mode="mean"))
    assert model[0].labels.dtype == torch.int16
    f = tmp_path / "i16.sws"
    sws.save(model, f)
    fresh = sws.load(f, torch.nn.Sequential(torch.nn.Linear(40, 10)))
    _same_state(model, fresh)
    assert fresh[0].labels.dtype == torch.int16 and fresh[0].mode == "mean"
    x = torch.randn(2, 40, generator=rng)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_round_trip_mean_field_with_tensor_priors(rng, tmp_path):
    model, _ = convert.to_mean_field(_arch(), 0.0, 0.3)
    model[3].prior_weight_mu = torch.randn(4, 150, generator=rng)  # non-scalar prior (as from bayesian-torch)
    f = tmp_path / "mf.sws"
    sws.save(model, f)
    fresh = sws.load(f, _arch())
    assert isinstance(fresh[3], snn.MeanFieldLinear) and fresh[3].dnn_to_bnn_flag and fresh[3].prior_variance == 0.3
    assert isinstance(fresh[0], snn.MeanFieldConv2d) and fresh[0].padding_mode == "reflect"
    _same_state(model, fresh)
    torch.testing.assert_close(fresh[3].prior_weight_mu, model[3].prior_weight_mu, rtol=0, atol=0)
    torch.testing.assert_close(sws.kl_loss(fresh), sws.kl_loss(model), rtol=0, atol=0)


def test_all_dtypes_and_sizes(rng, tmp_path):
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, dt in enumerate((torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)):
                t = (torch.randn(3, 2, generator=rng) * 50).to(dt)
                self.register_buffer(f"b{i}", t)
            self.register_buffer("empty", torch.zeros(0, 5))
            self.register_buffer("scalar", torch.tensor(3.5))
    bag = Bag()
    f = tmp_path / "bag.sws"
    sws.save(bag, f)
    sd = sws.load(f)
    for k, v in bag.state_dict().items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and torch.equal(sd[k], v), k


def test_corrupted_and_mismatched_files(rng, tmp_path):
    model = _sws_model(rng, K=20)
    f = tmp_path / "m.sws"
    sws.save(model, f)
    blob = bytearray(f.read_bytes())
    bad = tmp_path / "bad.sws"
    # flipped data byte -> checksum
    b2 = bytearray(blob)
    b2[-3] ^= 0xFF
    bad.write_bytes(bytes(b2))
    with pytest.raises(ValueError, match="corrupted"):
        sws.load(bad)
    # truncated
    bad.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(ValueError, match="corrupted|truncated"):
        sws.load(bad)
    # not our format
    bad.write_bytes(b"\x80\x02}q\x00." + bytes(20))
    with pytest.raises(ValueError, match="not an sws_kernels file"):
        sws.load(bad)
    (hlen,) = struct.unpack("<I", blob[8:12])
    # garbled header (the whole-file checksum catches it)
    b3 = bytearray(blob)
    b3[24:28] = b"!!!!"
    bad.write_bytes(bytes(b3))
    with pytest.raises(ValueError, match="corrupted"):
        sws.load(bad)
    # a header whose sizes disagree with shapes, checksum recomputed (a well-formed but lying file)
    hdr = json.loads(bytes(blob[20:20 + hlen]))
    e = next(e for e in hdr["tensors"] if "offsets" in e and e["offsets"][1] > e["offsets"][0])
    e["shape"] = [10**6]
    bad.write_bytes(_reframe(hdr, blob[20 + hlen:-4]))
    with pytest.raises(ValueError, match="inconsistent"):
        sws.load(bad)
    # a model that does not match the file
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rebuild=True"):
        sws.load(f, other)
    with pytest.raises(ValueError, match="does not match"):  # replaced, but BatchNorm's keys are missing
        sws.load(f, other, rebuild=True)
    with pytest.raises(TypeError, match="model"):
        sws.save("not a model", f)


def test_size_report(rng, tmp_path):
    model = _sws_model(rng)
    rep = io.size_report(model)
    mem, disk = rep["memory"], rep["disk"]
    sws_layers = [m for m in model.modules() if isinstance(m, snn.SWS_LAYERS)]
    assert mem["labels"] == sum(m.labels.numel() * m.labels.element_size() for m in sws_layers)
    K = model[0].codebook.num_components
    assert mem["codebook"] == K * (2 + 3) * 4 * 2 + 8  # means, chol, priors, rng_id: counted once
    assert disk["labels"] == sum((m.labels.numel() * io.label_bits(K) + 7) // 8 for m in sws_layers)
    assert disk["labels"] <= mem["labels"]  # ceil(log2 K) bits on disk, uint8 / int16 in memory
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert disk["total"] == sum(v for k, v in disk.items() if k != "total")
    assert disk["total"] == sws.save(model, tmp_path / "m.sws") == (tmp_path / "m.sws").stat().st_size
    mf, _ = convert.to_mean_field(_arch())
    mrep = io.size_report(mf)["memory"]
    assert mrep["mean_field"] > 0 and mrep["biases"] > 0 and mrep["labels"] == 0


def test_flipout_estimator_round_trips(tmp_path):
    model = torch.nn.Sequential(snn.MeanFieldLinear(4, 3, estimator="flipout"), snn.MeanFieldConv2d(2, 3, 3))
    path = tmp_path / "flipout.sws"
    sws.save(model, path)
    fresh = torch.nn.Sequential(snn.MeanFieldLinear(4, 3), snn.MeanFieldConv2d(2, 3, 3, estimator="flipout"))
    sws.load(path, fresh)
    assert fresh[0].estimator == "flipout" and fresh[1].estimator == "reparameterization"
