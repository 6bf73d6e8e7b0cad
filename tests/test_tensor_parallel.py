"""Tensor-parallel SWS and mean-field Linear layers (issue 18 item 5): sws_kernels.distributed.parallelize_linear.

Two gloo processes on localhost (torch.multiprocessing.spawn, once per module, like test_distributed.py). In
each, every scenario builds the same layer on both ranks, keeps an unsharded copy, shards the layer colwise or
rowwise over the 2-rank mesh (uneven shapes: 7 rows -> 4 + 3, 10 columns -> 5 + 5; aligned: 8 x 16), runs one
forward and backward of both with the same seed and DTensor inputs, and records the differences: outputs (the
sharded output's full tensor), the input gradient, the codebook / mean-field / outlier / bias gradients of the
shard against the corresponding entries of the unsharded layer's, and the layer KLs (summed over the shards). The tests check them at the op tests'
tolerances. S = 1 and 3, paper and hierarchical modes, outliers and ellipses on both sides of the split.
"""
import copy
import datetime
import os
import socket
import traceback

import pytest
import torch

from sws_kernels import distributed as sdist
from sws_kernels import nn as snn

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed unavailable", allow_module_level=True)

SHAPES = {"odd": (10, 7), "aligned": (16, 8)}  # (in, out)
SWS_CASES = [(kind, style, shape, S, mode) for kind in ("sws",) for style in sdist.TP_STYLES for shape in SHAPES
             for S in (1, 3) for mode in ("paper", "hierarchical")]
MF_CASES = [("mf", style, shape, S, None) for style in sdist.TP_STYLES for shape in SHAPES for S in (1, 3)]
CASES = SWS_CASES + MF_CASES
# the same scenarios with the Triton kernels under the interpreter (the ranks hold CPU tensors; on a GPU machine the
# op tests run the compiled kernels): shards launch the MAPPED variants
TRITON_CASES = [("sws", "rowwise", "odd", 3, "hierarchical"), ("sws", "colwise", "aligned", 1, "hierarchical"),
                ("mf", "colwise", "odd", 3, None), ("mf", "rowwise", "aligned", 1, None)]


def _case_id(c):
    return "-".join(str(v) for v in c if v is not None)


def _layer(kind, shape, mode):
    IN, OUT = SHAPES[shape]
    torch.manual_seed(5)
    if kind == "mf":
        layer = snn.MeanFieldLinear(IN, OUT, rng_id=41)
        with torch.no_grad():
            layer.rho_weight.add_(torch.randn(OUT, IN))  # varied sigmas
        return layer
    cb = snn.Codebook(5, rng_id=40)
    n = IN * OUT
    pos = torch.randperm(n)[:9]  # spread over both shards whatever the split
    layer = snn.SWSLinear(IN, OUT, codebook=cb, mode=mode, rng_id=42,
                          ellipse=(pos[:4], torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1]),
                                   torch.tensor([0.2, 0.5, 0.7, 0.9])),
                          outliers=(pos[4:], torch.randn(5) * 0.3, torch.randn(5) - 3))
    with torch.no_grad():  # away from the prior (the initial fit): a non-zero outlier KL
        layer.outlier_mu.add_(torch.randn(5) * 0.2)
        layer.outlier_rho.add_(torch.randn(5) * 0.5)
    return layer


def _run(layer, x, gy, S, seed):
    kw = {"return_kl": False} if isinstance(layer, snn.MeanFieldLinear) else {}
    out = layer(x, samples=S, seed=seed, **kw)
    full = out.full_tensor() if hasattr(out, "full_tensor") else out
    (full * gy).sum().backward()
    return full.detach()


def _scenario(case, mesh, rank):
    from torch.distributed.tensor import DTensor, Replicate
    kind, style, shape, S, mode = case
    IN, OUT = SHAPES[shape]
    ref = _layer(kind, shape, mode)
    tp = copy.deepcopy(ref)
    if kind == "sws":
        tp.codebook = copy.deepcopy(ref.codebook)  # deepcopy already copies it; explicit: its own params
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, IN, generator=g)
    gy = torch.randn(S, 3, OUT, generator=g)
    seed = 123456789
    xr = x.clone().requires_grad_()
    y_ref = _run(ref, xr, gy, S, seed)
    sdist.parallelize_linear(tp, mesh, style)
    xt = x.clone().requires_grad_()
    xd = DTensor.from_local(xt, mesh, (Replicate(),), run_check=False)  # redistributed by the layer as needed
    y_tp = _run(tp, xd, gy, S, seed)
    info = tp._tp
    r0, r1, c0, c1 = info.r0, info.r1, info.c0, info.c1
    pairs = {"out": (y_tp, y_ref), "x.grad": (xt.grad, xr.grad)}
    # the KLs of the whole layer (collectives over the shards), as the unsharded layer's
    pairs["kl_loss"] = (tp.kl_loss(), ref.kl_loss())
    # sample_weights: the shard's block of the unsharded layer's weights
    pairs["sample_weights"] = (tp.sample_weights(samples=2, seed=99),
                               ref.sample_weights(samples=2, seed=99)[:, r0:r1, c0:c1])
    if kind == "mf":
        pairs["kl_sum"] = (tp.kl_sum(), ref.kl_sum())
        pairs["mu.grad"] = (tp.mu_weight.grad, ref.mu_weight.grad[r0:r1, c0:c1])
        pairs["rho.grad"] = (tp.rho_weight.grad, ref.rho_weight.grad[r0:r1, c0:c1])
        rows = slice(r0, r1) if style == "colwise" else slice(None)
        pairs["mu_bias.grad"] = (tp.mu_bias.grad, ref.mu_bias.grad[rows])
        pairs["rho_bias.grad"] = (tp.rho_bias.grad, ref.rho_bias.grad[rows])
    else:
        pairs["means.grad"] = (tp.codebook.means.grad, ref.codebook.means.grad)
        pairs["chol.grad"] = (tp.codebook.chol.grad, ref.codebook.chol.grad)
        rows = slice(r0, r1) if style == "colwise" else slice(None)
        pairs["bias.grad"] = (tp.bias.grad, ref.bias.grad[rows])
        # the shard's outliers by their global positions
        gpos = (tp.outlier_pos // (c1 - c0) + r0) * IN + tp.outlier_pos % (c1 - c0) + c0
        idx = torch.stack([(ref.outlier_pos == p).nonzero()[0, 0] for p in gpos]) if gpos.numel() else gpos
        for n in ("outlier_mu", "outlier_rho"):
            got = getattr(tp, n).grad
            got = torch.zeros(0) if got is None else got
            pairs[n + ".grad"] = (got, getattr(ref, n).grad[idx])
        pairs["labels"] = (tp.labels.long(), ref.labels[r0:r1, c0:c1].long())
        pairs["n_outliers"] = (torch.tensor(tp.outlier_pos.numel()), torch.tensor(idx.numel()))
    return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in pairs.items()}, info.rank, (r0, r1, c0, c1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    res = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        for case in CASES:
            try:
                res[case] = _scenario(case, mesh, rank)
            except Exception:  # noqa: BLE001 - reported by the test of this case
                res[case] = traceback.format_exc()
        import sws_kernels
        for case in TRITON_CASES:
            try:
                if os.environ.get("TRITON_INTERPRET") != "1" or not sws_kernels.backends()["triton"][0]:
                    # the ranks' tensors are CPU tensors: Triton runs them only under its interpreter
                    res[("triton", case)] = "skip: Triton on CPU tensors needs TRITON_INTERPRET=1"
                    continue
                with sws_kernels.backend("triton"):
                    res[("triton", case)] = _scenario(case, mesh, rank)
            except Exception:  # noqa: BLE001 - reported by the test of this case
                res[("triton", case)] = traceback.format_exc()
        res["errors"] = _errors(mesh)
        res["readme"] = _readme_like(mesh)
    except Exception:  # noqa: BLE001
        res["crash"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def _errors(mesh):
    out = {}
    out["style"] = _err(lambda: sdist.parallelize_linear(snn.MeanFieldLinear(4, 4, rng_id=1), mesh, "diagonal"))
    out["type"] = _err(lambda: sdist.parallelize_linear(torch.nn.Linear(4, 4), mesh, "colwise"))
    out["small"] = _err(lambda: sdist.parallelize_linear(snn.MeanFieldLinear(4, 1, rng_id=2), mesh, "colwise"))
    layer = sdist.parallelize_linear(snn.MeanFieldLinear(6, 4, rng_id=3), mesh, "rowwise")
    out["twice"] = _err(lambda: sdist.parallelize_linear(layer, mesh, "rowwise"))
    out["x"] = _err(lambda: layer(torch.randn(2, 6)))  # a plain tensor is taken as this rank's 3 columns
    out["consistency"] = _err(lambda: sdist.parallelize_linear(
        snn.MeanFieldLinear(6, 4, rng_id=10 + mesh.get_local_rank()), mesh, "colwise"))
    return out


def _readme_like(mesh):
    """A Megatron pair: colwise -> relu -> rowwise, the colwise output feeding the rowwise layer as it is."""
    torch.manual_seed(0)
    cb = snn.Codebook(16, rng_id=50)
    model = torch.nn.Sequential(snn.SWSLinear(8, 6, codebook=cb, rng_id=51), torch.nn.ReLU(),
                                snn.SWSLinear(6, 3, codebook=cb, rng_id=52))
    ref = copy.deepcopy(model)
    sdist.parallelize(model, mesh, {"0": "colwise", "2": "rowwise"})
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    y = model(x).full_tensor()
    y.sum().backward()
    torch.manual_seed(1)
    yr = ref(x)
    yr.sum().backward()
    return {"out": (y.detach(), yr.detach()), "means.grad": (model[0].codebook.means.grad, ref[0].codebook.means.grad)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:
        assert "crash" not in r, r["crash"]
    return res


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_shard_matches_unsharded_layer(world, case):
    _check_case(world, case, case)


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_shard_matches_unsharded_layer_triton(world, case):
    r = world[0][("triton", case)]
    if isinstance(r, str) and r.startswith("skip: "):
        pytest.skip(r[6:])
    _check_case(world, ("triton", case), case)


def _check_case(world, key, case):
    spans = []
    for rank, res in enumerate(world):
        r = res[key]
        assert not isinstance(r, str), f"rank {rank}:\n{r}"
        pairs, _, span = r
        spans.append(span)
        for name, (got, want) in pairs.items():
            # the op tests' tolerances (fp32 kernels vs the same noise; sums over shards in another order)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
    (r0a, r1a, c0a, c1a), (r0b, r1b, c0b, c1b) = spans
    IN, OUT = SHAPES[case[2]]
    if case[1] == "colwise":  # torch.chunk's split: 7 -> 4 + 3
        assert (r0a, r1a, r0b, r1b) == (0, -(-OUT // 2), -(-OUT // 2), OUT) and (c0a, c1a) == (0, IN)
    else:
        assert (c0a, c1a, c0b, c1b) == (0, -(-IN // 2), -(-IN // 2), IN) and (r0a, r1a) == (0, OUT)
    if case[0] == "sws":  # the outliers are split between the ranks, none lost
        assert sum(int(world[r][key][0]["n_outliers"][0]) for r in range(2)) == 5


def test_colwise_rowwise_pair_matches_unsharded(world):
    for res in world:
        for name, (got, want) in res["readme"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_errors_name_the_argument(world):
    e = world[0]["errors"]
    assert e["style"].startswith("ValueError: style: expected one of ('colwise', 'rowwise')")
    assert e["type"].startswith("TypeError: layer: expected a sws_kernels.nn.SWSLinear or MeanFieldLinear")
    assert e["small"].startswith("ValueError: layer: colwise sharding splits out_features = 1 over 2 ranks")
    assert e["twice"].startswith("ValueError: layer: already tensor-parallel")
    assert e["x"].startswith("ValueError: x: expected a last dimension of 3 (this rank's columns [0, 3))")
    assert e["consistency"] is not None and e["consistency"].startswith("RuntimeError")
