"""Integration with PyTorch machinery: torch.compile, autocast, DistributedDataParallel (gloo, 2 processes)."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import sws_kernels as sws
from sws_kernels import nn as snn


class Net(torch.nn.Module):
    """SWS conv -> mean-field conv -> SWS linear, every layer sampled with the caller's seed."""

    def __init__(self, K=7):
        super().__init__()
        # explicit rng_ids: identical models in every process (DDP) and between eager and compiled copies
        cb = snn.Codebook(K, rng_id=100)
        self.c1 = snn.SWSConv2d(3, 4, 3, padding=1, codebook=cb, mode="hierarchical", rng_id=101,
                                outliers=(torch.tensor([0, 50]), torch.tensor([0.3, -0.3]), torch.tensor([-3.0, -3.0])),
                                ellipse=(torch.tensor([7]), torch.tensor([0]), torch.tensor([3]), torch.tensor([0.4])))
        self.c2 = snn.MeanFieldConv2d(4, 4, 3, 2, 1, rng_id=102)
        self.fc = snn.SWSLinear(4 * 3 * 3, 5, codebook=cb, rng_id=103)

    def forward(self, x, seed, samples=2):
        h = torch.relu(self.c1(x, samples=samples, seed=seed))
        h = torch.relu(self.c2(h, return_kl=False, samples=samples, seed=seed, per_sample=True))
        return self.fc(h.flatten(2), samples=samples, seed=seed, per_sample=True)


def _make(seed):
    torch.manual_seed(seed)  # labels=None draws a Kaiming-uniform init from the global generator
    return _init(Net(), seed)


def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(out) == sum(p.numel() > 0 for p in model.parameters())  # every non-empty parameter has a grad
    return out


def test_torch_compile_matches_eager(rng):
    torch._dynamo.reset()
    model = _make(1)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6, generator=rng)
    y = torch.randint(0, 5, (2,), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    out_e = model(x, seed)
    loss_e = sws.elbo_loss(out_e, y, model, num_data=100)
    loss_e.backward()
    g_e = _grads(model)
    model.zero_grad()
    out_c = compiled(x, seed)
    loss_c = sws.elbo_loss(out_c, y, model, num_data=100)
    loss_c.backward()
    g_c = _grads(model)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # a new seed gives new samples through the compiled module too
    assert not torch.allclose(compiled(x, seed + 1), out_c)


def test_torch_compile_inductor_forward_backward(rng):
    """The default backend (inductor, C++ codegen on CPU): same outputs and gradients as eager."""
    torch._dynamo.reset()
    model = _make(4)
    x = torch.randn(2, 3, 6, 6, generator=rng)
    y = torch.randint(0, 5, (2,), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    sws.elbo_loss(model(x, seed), y, model, num_data=50).backward()
    g_e = _grads(model)
    model.zero_grad()
    out = torch.compile(model)(x, seed)
    torch.testing.assert_close(out, model(x, seed), rtol=1e-5, atol=1e-6)
    sws.elbo_loss(out, y, model, num_data=50).backward()
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, g_e[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(rng, dtype):
    model = _make(2)
    x = torch.randn(3, 3, 6, 6, generator=rng)
    seed = 1234
    ref = model(x, seed)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, seed)
    assert out.dtype == dtype  # activations in low precision ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... parameters stay fp32
    err = (out.float() - ref).abs().max()
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert float(err) <= tol * float(ref.abs().max()), float(err)
    out.float().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), n
    with torch.autocast("cpu", dtype=dtype):  # the S-sample prediction path too
        p = sws.predict(torch.nn.Sequential(snn.SWSLinear(4, 3, codebook=snn.Codebook(5))), torch.randn(2, 4), 3)
    assert p.shape == (3, 2, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, x, y, seed, out_dir):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _make(3)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        # the same seed on every rank: every rank uses the same weight sample (see sws_kernels.nn docs)
        loss = sws.elbo_loss(ddp(xs, seed), ys, model, num_data=1000)
        loss.backward()
        if rank == 0:
            torch.save(_grads(model), os.path.join(out_dir, "ddp.pt"))
        # a second step: DDP would fail here if a parameter never received a gradient
        model.zero_grad()
        sws.elbo_loss(ddp(xs, seed + 1), ys, model, num_data=1000).backward()
        del ddp, model, loss
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(rng, tmp_path):
    import torch.multiprocessing as mp
    x = torch.randn(6, 3, 6, 6, generator=rng)
    y = torch.randint(0, 5, (6,), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, y, seed, str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "ddp.pt")
    model = _make(3)
    loss = sws.elbo_loss(model(x, seed), y, model, num_data=1000)  # the combined batch in one process
    loss.backward()
    single = _grads(model)
    assert set(ddp_grads) == set(single)
    for n in single:
        torch.testing.assert_close(ddp_grads[n], single[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
