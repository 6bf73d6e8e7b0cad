"""sws_kernels.distributed (issue 18): DDP with any codebook size, noise streams consistent across ranks, plain
and DCP checkpoints of wrapped models.

The multi-process scenarios run in ONE 2-process gloo world (torch.multiprocessing.spawn, localhost) started
once per module (the ``world`` fixture); each scenario records its results or its error message per rank and
the tests below check them against one process on the combined batch with the same seeds.
"""
import datetime
import os
import socket
import traceback

import pytest
import torch

import sws_kernels as sws
from sws_kernels import distributed as sdist
from sws_kernels import nn as snn

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed unavailable", allow_module_level=True)


class Net(torch.nn.Module):
    """SWS (hierarchical, outliers, ellipses) -> mean-field -> SWS, the codebook shared by both SWS layers."""

    def __init__(self, K, rng_base=None, extras=True):
        super().__init__()
        rid = (lambda i: None) if rng_base is None else (lambda i: rng_base + i)
        cb = snn.Codebook(K, rng_id=rid(0))
        special = {}
        if extras:
            special = dict(outliers=(torch.tensor([0, 13]), torch.tensor([0.3, -0.3]), torch.tensor([-3.0, -3.0])),
                           ellipse=(torch.tensor([5, 40, 41]), torch.tensor([0, 1, 2]), torch.tensor([K - 1, 2, 0]),
                                    torch.tensor([0.4, 0.7, 0.1])))
        self.fc1 = snn.SWSLinear(6, 12, codebook=cb, mode="hierarchical", rng_id=rid(1), **special)
        self.mf = snn.MeanFieldLinear(12, 12, rng_id=rid(2))
        self.fc2 = snn.SWSLinear(12, 3, codebook=cb, rng_id=rid(3))

    def forward(self, x, samples=2):  # seed=None: every layer draws its seed from the default generator
        if getattr(self, "kl_in_forward", False):  # the layers' KLs from their forwards (bayesian-torch style)
            h, k1 = self.fc1(x, samples=samples, return_kl=True)
            h, k2 = self.mf(torch.relu(h), return_kl=True, samples=samples, per_sample=True)
            out, k3 = self.fc2(torch.relu(h), samples=samples, per_sample=True, return_kl=True)
            return out, k1 + k2 + k3
        h = torch.relu(self.fc1(x, samples=samples))
        h = torch.relu(self.mf(h, return_kl=False, samples=samples, per_sample=True))
        return self.fc2(h, samples=samples, per_sample=True)


def _make(K, rng_base=100, extras=True, seed=3):
    torch.manual_seed(seed)  # labels=None: a Kaiming-uniform init drawn from the global generator
    model = Net(K, rng_base, extras)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _data(n=6):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, call, x, y):
    out = call(x)
    sws.elbo_loss(out, y, model, num_data=100).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _kl_forward_step(model, x, y):
    """One step with the KL taken from the forward: BMA cross-entropy + KL / 100, outputs and full grads."""
    model.kl_in_forward = True
    out, kl = model(x)
    logp = torch.logsumexp(out.log_softmax(-1), 0) - torch.log(torch.tensor(float(out.shape[0])))
    (torch.nn.functional.nll_loss(logp, y) + kl / 100).backward()
    return out.detach(), {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_steps(model, call, x, y, lr=0.1):
    """Two training steps (SGD in between): outputs and full gradients of both."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    res = []
    for _ in range(2):
        opt.zero_grad()
        out = call(x)
        sws.elbo_loss(out, y, model, num_data=100).backward()
        res.append((out.detach(), {n: _full(p.grad).clone() for n, p in model.named_parameters()
                                   if p.grad is not None}))
        opt.step()
    return res


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------------------------
# The 2-process world
# ------------------------------------------------------------------------------------------------------

def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a bounded timeout: a scenario that desynchronised the ranks fails (recorded as a crash) instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    res = {}
    try:
        x, y = _data()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]

        # 1. any K: labels int16 (K = 300, 4096); rank 1's labels/alpha scrambled (other generator) before
        #    wrapping: the byte broadcast gives it rank 0's
        for K in (300, 4096):
            model = _make(K)
            if rank == 1:
                g = torch.Generator().manual_seed(99)
                with torch.no_grad():
                    model.fc1.labels.copy_(torch.randint(0, K, model.fc1.labels.shape, generator=g))
                    model.fc1.ellipse_alpha.fill_(0.5)
            version = model.fc1.labels._version
            # K = 4096: every buffer broadcast in place through its byte view; K = 300: packed into buckets
            sdist._SMALL_BYTES, sdist._BUCKET_BYTES = (0, 1 << 26) if K == 4096 else (1 << 20, 64)
            ddp = sdist.ddp(model)
            bumped = model.fc1.labels._version > version
            out, grads = _step(model, ddp, xs, ys)
            model.zero_grad()
            _step(model, ddp, xs, ys)  # a second step runs
            res[f"K{K}"] = dict(out=out, grads=grads, dtype=model.fc1.labels.dtype, bumped=bumped,
                                labels=model.fc1.labels.clone(), alpha=model.fc1.ellipse_alpha.clone(),
                                ignored=sorted(model._ddp_params_and_buffers_to_ignore))
            if K == 300:
                # 3. checkpoints of the wrapped model: sws.save (plain keys), DCP into other sizes, full state dicts
                state = {k: v.clone() for k, v in model.state_dict().items()}
                res["state"] = state
                if rank == 0:
                    sws.save(ddp, os.path.join(out_dir, "ddp.sws"))
                sdist.save_dcp(ddp, os.path.join(out_dir, "dcp"))
                dist.barrier()
                small = _make(5, rng_base=7, extras=False)
                resized = sdist.resize_to_checkpoint(small, os.path.join(out_dir, "dcp"))
                small = _make(5, rng_base=7, extras=False)
                sdist.load_dcp(small, os.path.join(out_dir, "dcp"))
                res["dcp_resized"] = resized
                res["dcp_loaded"] = {k: v.clone() for k, v in small.state_dict().items()}
                res["dcp_owner"] = (small.fc1.owner, small.codebook_owner if hasattr(small, "codebook_owner")
                                    else small.fc1.codebook.owner)
                # a plain full state dict (shared codebook keys under fc1. and fc2.) into a DDP-wrapped model,
                # with and without the wrapper's prefix; changing sizes inside the wrapper raises
                other = sdist.ddp(_make(300, seed=5))
                sdist.load_state_dict(other, state)
                res["full_sd"] = {k: torch.equal(v, state[k]) for k, v in other.module.state_dict().items()}
                other2 = sdist.ddp(_make(300, seed=6))
                sdist.load_state_dict(other2, ddp.state_dict())
                res["prefixed_sd"] = all(torch.equal(v, state[k]) for k, v in other2.module.state_dict().items())
                res["wrapped_resize"] = _error(lambda: sdist.load_dcp(sdist.ddp(_make(5, extras=False)),
                                                                      os.path.join(out_dir, "dcp")))
                del other, other2

        # 2. consistency: one extra module first (default rng_ids) / one extra torch.rand / after wrapping
        torch.manual_seed(0)
        if rank == 1:
            snn.Codebook(3)
        m = Net(7)
        res["extra_module"] = _error(lambda: sdist.ddp(m))
        torch.manual_seed(0)
        m = _make(7, seed=0)
        if rank == 1:
            torch.rand(1)
        res["extra_rand"] = _error(lambda: sdist.ddp(m))
        m = _make(7, seed=0)
        w = sdist.ddp(m)
        if rank == 1:
            torch.rand(1)
        res["extra_rand_after_wrap"] = _error(lambda: w(xs))
        del w
        # independent samples on purpose: no error, ids still rank 0's
        torch.manual_seed(1000 + rank)
        if rank == 1:
            snn.Codebook(3)
        m = Net(7)
        res["independent_before"] = [mm.owner for mm in (m.fc1.codebook, m.fc1, m.mf, m.fc2)]
        w = sdist.ddp(m, independent=True)
        _step(m, w, xs, ys)
        res["independent_after"] = [mm.owner for mm in (m.fc1.codebook, m.fc1, m.mf, m.fc2)]
        res["independent_buffers"] = [int(mm.rng_id) for mm in (m.fc1.codebook, m.fc1, m.mf, m.fc2)]
        del w
        # 4. FSDP2: codebook shared by two layers, per-layer units + root, elbo_loss after forward, 2 steps
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        model = sdist.fully_shard(_make(300), mesh=mesh)
        res["fsdp_steps"] = _fsdp_steps(model, model, xs, ys)
        # labels sharded with their layer (int16 at K = 300): a DTensor between steps, this rank's rows only
        res["fsdp_labels"] = [(type(m.labels).__name__, tuple(m.labels.to_local().shape), m.labels.dtype,
                               "labels" in dict(m.named_parameters()), "labels" in dict(m.named_buffers()))
                              for m in (model.fc1, model.fc2)]
        kept = sdist.fully_shard(_make(300), mesh=mesh, shard_labels=False)
        res["fsdp_labels_kept"] = (type(kept.fc1.labels).__name__, tuple(kept.fc1.labels.shape))
        del kept
        with sdist.gathered(model):
            res["fsdp_kl"] = sws.kl_loss(model).detach()
        full = sdist.state_dict(model)
        res["fsdp_state"] = {k: v.clone() for k, v in full.items()}
        res["fsdp_aliases"] = full["fc1.codebook.means"] is full["fc2.codebook.means"]
        other = sdist.fully_shard(_make(300, seed=8), mesh=mesh)
        sdist.load_state_dict(other, full)  # shared codebook under fc1. and fc2.
        res["fsdp_loaded"] = {k: v.clone() for k, v in sdist.state_dict(other).items()}
        sdist.save_dcp(model, os.path.join(out_dir, "fsdp_dcp"))  # sharded
        res["fsdp_save"] = sdist.save(model, os.path.join(out_dir, "fsdp.sws"))  # rank 0 writes
        sws.save(model, os.path.join(out_dir, f"fsdp{rank}.sws"))  # every rank gathers and writes
        res["fsdp_still_sharded"] = type(model.fc1).__name__
        res["fsdp_dcp_resize"] = _error(lambda: sdist.load_dcp(sdist.fully_shard(_make(5, extras=False), mesh=mesh),
                                                               os.path.join(out_dir, "fsdp_dcp")))
        plain = sdist.load_dcp(_make(5, extras=False), os.path.join(out_dir, "fsdp_dcp"))
        res["fsdp_dcp_plain"] = {k: v.clone() for k, v in plain.state_dict().items()}
        again = sdist.fully_shard(_make(300, seed=9), mesh=mesh)
        sdist.load_dcp(again, os.path.join(out_dir, "fsdp_dcp"))
        res["fsdp_dcp_sharded"] = {k: v.clone() for k, v in sdist.state_dict(again).items()}
        del model, other, again
        model = sdist.fully_shard(_make(300), mesh=mesh)
        res["fsdp_kl_forward"] = _kl_forward_step(model, xs, ys)
        res["fsdp_resharded"] = type(model.fc1.outlier_mu).__name__
        m = _make(7, seed=0)
        if rank == 1:
            torch.rand(1)
        res["fsdp_extra_rand"] = _error(lambda: sdist.fully_shard(m, mesh=mesh))
        res["fsdp_unsharded_after_error"] = type(m.fc1).__name__
        m = _make(7, seed=0)
        sdist.fully_shard(m, mesh=mesh)
        if rank == 1:
            torch.rand(1)
        res["fsdp_extra_rand_after"] = _error(lambda: m(xs))
        # plain torch DDP (K <= 256): its own broadcast of the rng_id buffers now moves the owners too
        torch.manual_seed(2)
        if rank == 1:
            snn.Codebook(3)
        m = Net(7)
        res["plain_before"] = [mm.owner for mm in (m.fc1.codebook, m.fc1, m.mf, m.fc2)]
        w = torch.nn.parallel.DistributedDataParallel(m)
        res["plain_after"] = [mm.owner for mm in (m.fc1.codebook, m.fc1, m.mf, m.fc2)]
        res["plain_sample"] = m.fc1.sample_weights(seed=5)
        del w
    except Exception:  # noqa: BLE001 - reported by the test
        res["crash"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:
        assert "crash" not in r, r["crash"]
    return out, res


def _assert_close_dicts(a, b, **kw):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}", **kw)


# ------------------------------------------------------------------------------------------------------
# 1. DDP with any K
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [300, 4096])
def test_ddp_any_K_matches_one_process(world, K):
    _, res = world
    x, y = _data()
    model = _make(K)
    out, grads = _step(model, model, x, y)  # the combined batch in one process, same seeds
    r0, r1 = res[0][f"K{K}"], res[1][f"K{K}"]
    assert r0["dtype"] == torch.int16 and model.fc1.labels.dtype == torch.int16
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]], dim=1), out, rtol=1e-5, atol=1e-6)
    _assert_close_dicts(r0["grads"], grads, rtol=1e-5, atol=1e-6)
    _assert_close_dicts(r1["grads"], grads, rtol=1e-5, atol=1e-6)
    # rank 1's scrambled labels/alpha were replaced by rank 0's through the byte broadcast
    assert torch.equal(r1["labels"], model.fc1.labels) and torch.equal(r1["alpha"], model.fc1.ellipse_alpha)
    assert r1["bumped"]  # the written labels have a new version (bindings re-check them)
    # every constant buffer, under every name (the shared codebook's under fc1. and fc2.), is left to us
    for name in ("fc1.labels", "fc2.labels", "fc1.codebook.means0", "fc2.codebook.chol0", "mf.rng_id",
                 "fc1.outlier_pos", "fc1.ellipse_a"):
        assert name in r0["ignored"]
    assert not any(n.endswith(("means", "chol", "outlier_mu", "bias")) for n in r0["ignored"])


# ------------------------------------------------------------------------------------------------------
# 2. noise streams consistent across ranks
# ------------------------------------------------------------------------------------------------------

def test_rank_with_extra_module_raises(world):
    _, res = world
    for r in res:
        msg = r["extra_module"]
        assert msg and msg.startswith("RuntimeError") and "rng_id" in msg and "independent=True" in msg, msg
        assert "'fc1.codebook'" in msg or "'fc1'" in msg, msg


def test_rank_with_extra_rand_raises(world):
    _, res = world
    for r in res:
        msg = r["extra_rand"]
        assert msg and msg.startswith("RuntimeError") and "random generator" in msg and "when wrapping" in msg, msg
        msg = r["extra_rand_after_wrap"]
        assert msg and msg.startswith("RuntimeError") and "on the first forward" in msg, msg


def test_independent_samples_keep_rank0_ids(world):
    _, res = world
    assert res[0]["independent_before"] != res[1]["independent_before"]  # built differently on purpose
    for r in res:
        assert r["independent_after"] == res[0]["independent_before"] == r["independent_buffers"]


def test_plain_ddp_owner_follows_broadcast_buffer(world):
    _, res = world
    assert res[0]["plain_before"] != res[1]["plain_before"]
    assert res[0]["plain_after"] == res[1]["plain_after"] == res[0]["plain_before"]
    torch.testing.assert_close(res[0]["plain_sample"], res[1]["plain_sample"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# 3. checkpoints
# ------------------------------------------------------------------------------------------------------

def test_save_of_ddp_model_has_plain_keys(world):
    out, res = world
    state = res[0]["state"]
    header = sws.io.read_header(out / "ddp.sws")
    keys = [e["key"] for e in header["tensors"]]
    assert keys and not any(k.startswith("module.") for k in keys)
    model = _make(5, rng_base=1, extras=False)  # other K, no outliers/ellipses: the file's modules replace them
    sws.load(out / "ddp.sws", model)
    _assert_close_dicts(model.state_dict(), state, rtol=0, atol=0)


def test_dcp_load_into_other_sizes(world):
    out, res = world
    state = res[0]["state"]
    for r in res:  # each rank, a K=5 model without outliers/ellipses
        assert {"fc1.codebook.means", "fc1.labels", "fc1.outlier_mu", "fc1.ellipse_pos"} <= set(r["dcp_resized"])
        _assert_close_dicts(r["dcp_loaded"], state, rtol=0, atol=0)
        assert r["dcp_owner"] == (101, 100)
    # one process without a process group loads the 2-rank checkpoint too, and runs the same
    model = _make(9, rng_base=3, extras=False)
    sdist.load_dcp(model, out / "dcp")
    _assert_close_dicts(model.state_dict(), state, rtol=0, atol=0)
    assert model.fc1.labels.dtype == torch.int16 and model.fc1.codebook.num_components == 300
    assert model.fc1.codebook is model.fc2.codebook
    ref = _make(300)
    ref.load_state_dict(state)
    x, _ = _data()
    torch.manual_seed(4)
    a = model(x)
    torch.manual_seed(4)
    torch.testing.assert_close(a, ref(x), rtol=0, atol=0)


def test_full_state_dict_into_ddp(world):
    _, res = world
    for r in res:
        assert r["full_sd"] and all(r["full_sd"].values())
        assert "fc1.codebook.means" in r["full_sd"] and "fc2.codebook.means" in r["full_sd"]
        assert r["prefixed_sd"] is True
        assert r["wrapped_resize"] and r["wrapped_resize"].startswith("ValueError") and "before wrapping" in \
            r["wrapped_resize"], r["wrapped_resize"]


# ------------------------------------------------------------------------------------------------------
# 4. FSDP2
# ------------------------------------------------------------------------------------------------------

def test_fsdp2_shared_codebook_matches_one_process(world):
    _, res = world
    x, y = _data()
    model = _make(300)
    ref = _fsdp_steps(model, model, x, y)
    for step in range(2):
        (o0, g0), (o1, g1) = res[0]["fsdp_steps"][step], res[1]["fsdp_steps"][step]
        torch.testing.assert_close(torch.cat([o0, o1], dim=1), ref[step][0], rtol=1e-5, atol=1e-6)
        _assert_close_dicts(g0, ref[step][1], rtol=1e-5, atol=1e-6)
        _assert_close_dicts(g1, ref[step][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0]["fsdp_kl"], sws.kl_loss(model).detach(), rtol=1e-6, atol=1e-6)
    state = model.state_dict()
    for r in res:
        _assert_close_dicts(r["fsdp_state"], state, rtol=1e-5, atol=1e-6)  # after 2 SGD steps on those grads
        assert r["fsdp_aliases"]


def test_fsdp2_labels_shard_with_their_layer(world):
    _, res = world
    # fc1 [12, 6] -> 6 + 6 rows; fc2 [3, 12] -> 2 + 1 rows (torch.chunk); frozen parameters, not buffers
    for rank, r in enumerate(res):
        (t1, s1, d1, p1, b1), (t2, s2, d2, p2, b2) = r["fsdp_labels"]
        assert (t1, t2, d1, d2) == ("DTensor", "DTensor", torch.int16, torch.int16)
        assert s1 == (6, 6) and s2 == ((2, 12) if rank == 0 else (1, 12))
        assert p1 and p2 and not b1 and not b2
        assert r["fsdp_labels_kept"] == ("Tensor", (12, 6))  # shard_labels=False: a replicated buffer


def test_fsdp2_kl_from_forward(world):
    _, res = world
    x, y = _data()
    model = _make(300)
    out, grads = _kl_forward_step(model, x, y)
    (o0, g0), (o1, g1) = res[0]["fsdp_kl_forward"], res[1]["fsdp_kl_forward"]
    torch.testing.assert_close(torch.cat([o0, o1], dim=1), out, rtol=1e-5, atol=1e-6)
    _assert_close_dicts(g0, grads, rtol=1e-5, atol=1e-6)
    _assert_close_dicts(g1, grads, rtol=1e-5, atol=1e-6)
    assert res[0]["fsdp_resharded"] == "DTensor"  # sharded again after the step


def test_fsdp2_state_dicts_and_dcp(world):
    _, res = world
    for r in res:
        state = r["fsdp_state"]
        _assert_close_dicts(r["fsdp_loaded"], state, rtol=0, atol=0)
        _assert_close_dicts(r["fsdp_dcp_plain"], state, rtol=0, atol=0)  # K 5 -> 300 on a plain model
        _assert_close_dicts(r["fsdp_dcp_sharded"], state, rtol=0, atol=0)
        msg = r["fsdp_dcp_resize"]
        assert msg and msg.startswith("ValueError") and "FSDP2" in msg and "before wrapping" in msg, msg
        assert r["fsdp_still_sharded"] == "FSDPSWSLinear"


def test_fsdp2_rank_with_extra_rand_raises(world):
    _, res = world
    for r in res:
        msg = r["fsdp_extra_rand"]
        assert msg and msg.startswith("RuntimeError") and "random generator" in msg and "when sharding" in msg, msg
        assert r["fsdp_unsharded_after_error"] == "SWSLinear"
        msg = r["fsdp_extra_rand_after"]
        assert msg and msg.startswith("RuntimeError") and "on the first forward" in msg, msg


def test_fsdp2_sws_save(world):
    out, res = world
    state = res[0]["fsdp_state"]
    assert res[0]["fsdp_save"] > 0 and res[1]["fsdp_save"] is None
    for name in ("fsdp.sws", "fsdp0.sws", "fsdp1.sws"):
        header = sws.io.read_header(out / name)
        assert {m["class"] for m in header["modules"].values()} == {"Codebook", "SWSLinear", "MeanFieldLinear"}
        model = sws.load(out / name, _make(5, rng_base=1, extras=False))
        _assert_close_dicts(model.state_dict(), state, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------------------

def test_unwrap_and_state_dict_prefixes():
    model = _make(7)
    wrapped = torch.nn.DataParallel(model)
    assert sdist.unwrap(wrapped) is model and sdist.unwrap(model) is model
    assert set(sdist.state_dict(wrapped)) == set(model.state_dict())
    other = _make(7, seed=9)
    sdist.load_state_dict(other, wrapped.state_dict())  # module.-prefixed keys
    _assert_close_dicts(other.state_dict(), model.state_dict(), rtol=0, atol=0)
    # a different size through a wrapper raises; the plain model resizes
    big = _make(300, seed=9)
    with pytest.raises(ValueError, match="before wrapping"):
        sdist.load_state_dict(torch.nn.DataParallel(_make(7)), big.state_dict())
    sdist.load_state_dict(other, big.state_dict())
    assert other.fc1.codebook.num_components == 300 and other.fc1.labels.dtype == torch.int16


def test_resize_to_checkpoint_and_dcp_round_trip(tmp_path):
    src = _make(4096)
    sdist.save_dcp(src, tmp_path / "ck")
    dst = _make(3, rng_base=50, extras=False)
    names = sdist.resize_to_checkpoint(dst, tmp_path / "ck")
    assert dst.fc1.labels.dtype == torch.int16 and dst.fc1.codebook.num_components == 4096
    assert dst.fc1.outlier_mu.shape == (2,) and dst.fc1.outlier_mu.requires_grad
    assert "fc1.labels" in names and "fc1.ellipse_alpha" in names
    sdist.load_dcp(dst, tmp_path / "ck")
    _assert_close_dicts(dst.state_dict(), src.state_dict(), rtol=0, atol=0)
    assert sdist.resize_to_checkpoint(dst, tmp_path / "ck") == []  # nothing left to resize
    # nested under a prefix, as in {"model": state_dict, ...}
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": src.state_dict(), "step": torch.tensor(3)}, checkpoint_id=tmp_path / "nested")
    dst = _make(3, rng_base=50, extras=False)
    sdist.load_dcp(dst, tmp_path / "nested", prefix="model.")
    _assert_close_dicts(dst.state_dict(), src.state_dict(), rtol=0, atol=0)
    # corrupt values are caught by the modules' entry checks after the load
    bad = _make(4096)
    with torch.no_grad():
        bad.fc1.ellipse_alpha.fill_(2.0)
    sdist.save_dcp(bad, tmp_path / "bad")
    with pytest.raises(ValueError, match="alpha"):
        sdist.load_dcp(_make(3, extras=False), tmp_path / "bad")


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="model"):
        sdist.prepare_ddp("net")
    with pytest.raises(TypeError, match="independent"):
        sdist.prepare_ddp(_make(7), independent=1)
    with pytest.raises(ValueError, match="before wrapping"):
        sdist.prepare_ddp(torch.nn.DataParallel(_make(7)))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            sdist.prepare_ddp(_make(7))
    with pytest.raises(TypeError, match="state_dict"):
        sdist.load_state_dict(_make(7), [1, 2])
    with pytest.raises(ValueError, match="checkpoint_id"):
        sdist.resize_to_checkpoint(_make(7))
    with pytest.raises(TypeError, match="prefix"):
        sdist.load_dcp(_make(7), tmp_path, prefix=3)


def test_constant_buffers_cover_every_module_buffer():
    model = _make(300)
    found = {n for names, _ in sdist.constant_buffers(model) for n in names}
    expected = {f"{p}.{b}" for p, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, snn._RngIdMixin) for b, t in m._buffers.items() if t is not None}
    assert found == expected
    assert "fc2.codebook.means0" in found and "fc1.codebook.means0" in found
    assert len(sdist.constant_buffers(model)) < len(found)  # the shared codebook's tensors counted once


# ------------------------------------------------------------------------------------------------------
# NCCL (GPU check): a one-GPU world, the dtype tables gloo does not have
# ------------------------------------------------------------------------------------------------------

def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _nccl_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=90))
    res = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        x, y = (t.cuda() for t in _data())
        model = _make(300).cuda()
        res["ddp"] = _step(model, sdist.ddp(model, device_ids=[0]), x, y)
        res["ddp_dtype"] = model.fc1.labels.dtype
        model = sdist.fully_shard(_make(300).cuda(), mesh=init_device_mesh("cuda", (1,)))
        res["fsdp"] = _fsdp_steps(model, model, x, y)
    except Exception:  # noqa: BLE001 - reported by the test
        res["crash"] = traceback.format_exc()
    finally:
        torch.save(_cpu(res), os.path.join(out_dir, "nccl.pt"))
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU and NCCL")
def test_nccl_ddp_and_fsdp2_on_gpu(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_nccl_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    res = torch.load(tmp_path / "nccl.pt", weights_only=False)
    assert "crash" not in res, res["crash"]
    assert res["ddp_dtype"] == torch.int16
    x, y = (t.cuda() for t in _data())
    model = _make(300).cuda()
    out, grads = _cpu(_step(model, model, x, y))
    torch.testing.assert_close(res["ddp"][0], out, rtol=1e-5, atol=1e-6)
    _assert_close_dicts(res["ddp"][1], grads, rtol=1e-5, atol=1e-6)
    model = _make(300).cuda()
    ref = _cpu(_fsdp_steps(model, model, x, y))
    for step in range(2):
        torch.testing.assert_close(res["fsdp"][step][0], ref[step][0], rtol=1e-5, atol=1e-6)
        _assert_close_dicts(res["fsdp"][step][1], ref[step][1], rtol=1e-5, atol=1e-6)
