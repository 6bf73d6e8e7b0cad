"""sws_kernels.attention: nn.MultiheadAttention made Bayesian (to_mean_field, to_sws), transformer layers, a ViT.

References: PyTorch's own nn.MultiheadAttention / F.multi_head_attention_forward, run with our sampled
weights (same seed) for exact checks, or with the deterministic weights when sigma is negligible.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sws_kernels as sws
from sws_kernels import convert
from sws_kernels import nn as snn
from sws_kernels import reference as R
from sws_kernels.attention import BayesianMultiheadAttention

TINY = 1e-7  # MOPED delta: sigma = TINY |w|, so a sample equals the deterministic weight to fp32 rounding


def _tiny_mean_field(m):
    return convert.to_mean_field(m, moped=True, moped_delta=TINY)[0]


def _mha_cases():
    E, H = 8, 2
    return [
        # (constructor kwargs, call builder)
        ("packed self-attn, seq-first, causal bool mask + is_causal, no weights",
         dict(embed_dim=E, num_heads=H), "self_causal"),
        ("packed cross-attn (key is value), batch_first, bool key_padding_mask, averaged weights",
         dict(embed_dim=E, num_heads=H, batch_first=True), "cross_kpm"),
        ("kdim/vdim, no bias, batch_first, float 3-D attn_mask, per-head weights",
         dict(embed_dim=E, num_heads=H, bias=False, kdim=5, vdim=3, batch_first=True), "sep_float3d"),
        ("bias_kv + zero_attn, q/k/v distinct, both masks",
         dict(embed_dim=E, num_heads=H, add_bias_kv=True, add_zero_attn=True), "bias_kv"),
        ("unbatched input with a 1-D key_padding_mask", dict(embed_dim=E, num_heads=H), "unbatched"),
    ]


def _call_args(kind, mha, rng):
    E, H, N, L, Lk = mha.embed_dim, mha.num_heads, 3, 4, 5
    bf = mha.batch_first

    def seq(n_len, dim):
        t = torch.randn(N, n_len, dim, generator=rng)
        return t if bf else t.transpose(0, 1).contiguous()

    if kind == "self_causal":
        q = seq(L, E)
        mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        return (q, q, q), dict(attn_mask=mask, is_causal=True, need_weights=False)
    if kind == "cross_kpm":
        q, kv = seq(L, E), seq(Lk, E)
        kpm = torch.zeros(N, Lk, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, 0] = True
        return (q, kv, kv), dict(key_padding_mask=kpm, need_weights=True)
    if kind == "sep_float3d":
        q, k, v = seq(L, E), seq(Lk, mha.kdim), seq(Lk, mha.vdim)
        am = torch.randn(N * H, L, Lk, generator=rng)
        return (q, k, v), dict(attn_mask=am, need_weights=True, average_attn_weights=False)
    if kind == "bias_kv":
        q, k, v = seq(L, E), seq(Lk, E), seq(Lk, E)
        am = torch.randn(L, Lk, generator=rng)
        kpm = torch.zeros(N, Lk, dtype=torch.bool)
        kpm[1, 1] = True
        return (q, k, v), dict(attn_mask=am, key_padding_mask=kpm, need_weights=True)
    if kind == "unbatched":
        q, kv = torch.randn(L, E, generator=rng), torch.randn(Lk, E, generator=rng)
        kpm = torch.tensor([False, True, False, False, False])
        return (q, kv, kv), dict(key_padding_mask=kpm, need_weights=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("desc,kwargs,kind", _mha_cases(), ids=[c[2] for c in _mha_cases()])
def test_matches_torch_multihead_attention(rng, desc, kwargs, kind):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(**kwargs).eval()
    if mha.bias_k is not None:  # nn.MultiheadAttention inits them with xavier; make them matter
        with torch.no_grad():
            mha.bias_k.normal_()
            mha.bias_v.normal_()
    args, kw = _call_args(kind, mha, rng)
    want, want_w = mha(*args, **kw)
    bmha = _tiny_mean_field(nn.ModuleDict({"a": copy.deepcopy(mha)}))["a"]
    assert isinstance(bmha, BayesianMultiheadAttention)
    assert all(isinstance(p, snn.MeanFieldLinear) for p in bmha.projections())
    got, got_w = bmha(*args, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)


def _torch_attention_per_sample(bmha, q, k, v, S, seed, kw):
    """PyTorch's F.multi_head_attention_forward with sample s's weights (what our kernels draw for that seed)."""
    def weights(layer):
        if isinstance(layer, snn.MeanFieldLinear):
            w = layer.sample_weights(samples=S, seed=seed)
            b = R.mean_field_bias(layer.mu_bias, layer.rho_bias, seed=seed, samples=S, owner=layer.owner)
        else:
            w = layer.sample_weights(samples=S, seed=seed)
            b = None if layer.bias is None else layer.bias.expand(S, -1)
        return w, b

    outs = []
    out_w, out_b = weights(bmha.out_proj)
    if bmha._qkv_same_embed_dim:
        in_w, in_b = weights(bmha.in_proj)
    else:
        ws = [weights(p) for p in (bmha.q_proj, bmha.k_proj, bmha.v_proj)]
    for s in range(S):
        extra = {}
        if bmha._qkv_same_embed_dim:
            iw, ib = in_w[s], None if in_b is None else in_b[s]
        else:
            iw = None
            ib = None if ws[0][1] is None else torch.cat([w[1][s] for w in ws])
            extra = dict(use_separate_proj_weight=True, q_proj_weight=ws[0][0][s], k_proj_weight=ws[1][0][s],
                         v_proj_weight=ws[2][0][s])
        o, _ = F.multi_head_attention_forward(
            q[s], k[s], v[s], bmha.embed_dim, bmha.num_heads, iw, ib, bmha.bias_k, bmha.bias_v, bmha.add_zero_attn,
            0.0, out_w[s], None if out_b is None else out_b[s], training=False, need_weights=False, **kw, **extra)
        outs.append(o)
    return torch.stack(outs)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("stage", ["mean_field", "sws"])
def test_sample_folding_exact_and_gradients_reach_the_codebook(rng, packed, stage):
    """Inside sample_mode(S, seed) (what sws.predict uses) slice s of the folded batch is exactly PyTorch's
    attention with sample s's weights, and the gradients (input, codebook or mu/rho) agree."""
    torch.manual_seed(1)
    E, H, N, L, S = 8, 2, 2, 3, 3
    kw = {} if packed else dict(kdim=5, vdim=6)
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H, **kw).eval()})  # seq-first: the module folds along N
    convert.to_mean_field(model, moped=True, moped_delta=0.3)
    if stage == "sws":
        convert.to_sws(model, num_components=4, progress=False)
    bmha = model["a"]
    q = torch.randn(L, N, E, generator=rng)
    k = torch.randn(L + 1, N, kw.get("kdim", E), generator=rng)
    v = torch.randn(L + 1, N, kw.get("vdim", E), generator=rng)
    kpm = torch.zeros(N, L + 1, dtype=torch.bool)
    kpm[1, 0] = True
    seed = 1234
    g = torch.randn(L, S * N, E, generator=rng)

    xs = [t.repeat(1, S, 1).requires_grad_() for t in (q, k, v)]  # folded batch: sample s = columns s*N..
    with snn.sample_mode(S, seed=seed):
        got, _ = bmha(*xs, key_padding_mask=kpm, need_weights=False)  # kpm for N: repeated for S*N inside
    params = [p for p in model.parameters() if p.requires_grad and p.numel()]
    (got * g).sum().backward()
    got_grads = [p.grad.clone() for p in params] + [x.grad.clone() for x in xs]
    for p in params:
        p.grad = None

    per = [t.detach().view(t.shape[0], S, N, t.shape[-1]).permute(1, 0, 2, 3).clone().requires_grad_() for t in xs]
    want = _torch_attention_per_sample(bmha, *per, S, seed, dict(key_padding_mask=kpm))
    want_folded = want.permute(1, 0, 2, 3).reshape(L, S * N, E)
    torch.testing.assert_close(got, want_folded, rtol=1e-5, atol=1e-5)
    (want_folded * g).sum().backward()
    want_grads = [p.grad for p in params] + [x.grad.permute(1, 0, 2, 3).reshape(x.shape[1], S * N, -1) for x in per]
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if stage == "sws":
        cb = bmha.out_proj.codebook
        i = next(j for j, p in enumerate(params) if p is cb.means)
        assert float(got_grads[i].abs().sum()) > 0  # the codebook learns through attention


def _encoder(norm_first=False):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True: the fused fast path is on for det.


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_transformer_encoder_never_runs_stale_fast_path(rng, mode):
    torch.manual_seed(2)
    det = _encoder().eval()
    assert det.use_nested_tensor  # PyTorch's fast path would run in eval mode with a padding mask
    x = torch.randn(3, 5, 8, generator=rng)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, -2:] = True
    want = det(x, src_key_padding_mask=kpm)
    bnn = _tiny_mean_field(copy.deepcopy(det))
    assert not bnn.use_nested_tensor
    getattr(bnn, mode)()
    got = bnn(x, src_key_padding_mask=kpm)
    keep = ~kpm  # the nested-tensor fast path zeroes padded positions; compare the real tokens
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    # the Bayesian weights are the ones used: change them and the output follows (nothing stale)
    with torch.no_grad():
        bnn.layers[0].self_attn.in_proj.mu_weight.mul_(0.5)
        bnn.layers[1].linear1.mu_weight.mul_(0.5)
    assert (bnn(x, src_key_padding_mask=kpm)[keep] - want[keep]).abs().max() > 1e-2
    # also after to_sws, in both modes, and the layer's own fast-path check stays off
    convert.to_sws(bnn, num_components=4, progress=False)
    for m in (bnn.eval(), bnn.train()):
        assert m(x, src_key_padding_mask=kpm).shape == x.shape
        assert m.layers[0](x).shape == x.shape  # TransformerEncoderLayer.forward directly (its own fast path)


def test_transformer_decoder_cross_attention(rng):
    torch.manual_seed(3)
    det = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0), 1).eval()  # seq-first
    tgt, mem = torch.randn(4, 2, 8, generator=rng), torch.randn(6, 2, 8, generator=rng)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    want = det(tgt, mem, tgt_mask=causal, tgt_is_causal=True)
    bnn = _tiny_mean_field(copy.deepcopy(det))
    assert isinstance(bnn.layers[0].multihead_attn, BayesianMultiheadAttention)
    torch.testing.assert_close(bnn(tgt, mem, tgt_mask=causal, tgt_is_causal=True), want, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    att = BayesianMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="is_causal"):
        att(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        att(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        att(torch.randn(2, 3, 6), x, x)
    with pytest.raises(ValueError, match="num_heads"):
        BayesianMultiheadAttention(8, 3)
    with pytest.raises(TypeError, match="attn_mask"):
        att(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int64))
    assert not hasattr(att, "in_proj_weight") and att.in_proj_bias is None


# --------------------------------------------------------------------------------------------------
# A small ViT: deterministic -> mean-field -> SWS, then training
# --------------------------------------------------------------------------------------------------

class TinyViT(nn.Module):
    def __init__(self, img=8, patch=4, channels=3, dim=16, heads=2, depth=2, classes=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)  # patch embedding
        n = (img // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=batch_first,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        if self.batch_first:
            return self.head(self.norm(self.encoder(t)[:, 0]))
        return self.head(self.norm(self.encoder(t.transpose(0, 1))[0]))  # a sequence-first encoder


@pytest.mark.parametrize("mode", ["paper", "hierarchical"])
def test_vit_deterministic_to_mean_field_to_sws_trains(rng, mode):
    torch.manual_seed(4)
    vit = TinyViT()
    x = torch.randn(16, 3, 8, 8, generator=rng)
    y = torch.randint(0, 4, (16,), generator=rng)
    vit, rep = convert.to_mean_field(vit)  # MOPED from the (here untrained) weights
    attn = [n for n in rep["converted"] if n.endswith("self_attn")]
    assert len(attn) == 2 and "patch" in rep["converted"] and "head" in rep["converted"]
    vit, rep = convert.to_sws(vit, num_components=6, mode=mode, progress=False)
    names = rep["layers"]
    assert "encoder.layers.0.self_attn.in_proj" in names and "encoder.layers.1.self_attn.out_proj" in names
    sws_layers = [m for m in vit.modules() if isinstance(m, snn.SWS_LAYERS)]
    assert len(sws_layers) == 2 + 2 * 4  # patch, head, and per encoder layer in_proj, out_proj, linear1, linear2
    cb = sws_layers[0].codebook
    assert all(m.codebook is cb for m in sws_layers)
    watched = [cb.means, cb.chol] + [p for m in sws_layers for p in (m.outlier_mu, m.outlier_rho) if p.numel()]
    assert len(watched) > 2  # some outliers exist to watch
    before = [p.detach().clone() for p in watched]
    opt = torch.optim.Adam(vit.parameters(), lr=1e-2)
    losses = []
    vit.train()
    for _ in range(30):
        opt.zero_grad()
        loss = sws.elbo_loss(vit(x), y, vit, num_data=1000)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    for j, (p, p0) in enumerate(zip(watched, before)):
        moved = p.detach() != p0
        if mode == "paper" and j == 1:
            # paper mode samples only z_mu: softplus(c), the rho-direction scale, gets no likelihood gradient and
            # starts at its KL optimum (posterior = prior), so it stays; every other entry must move
            moved = moved[:, :2]
        assert bool(moved.all()), f"a codebook or outlier entry did not move ({j}: {moved})"
    vit.eval()
    probs = sws.predict(vit, x[:4], samples=3)  # sample folding through attention
    assert probs.shape == (3, 4, 4) and torch.allclose(probs.sum(-1), torch.ones(3, 4))


def test_predict_through_a_sequence_first_encoder(rng):
    """predict folds the samples into the batch; in a batch_first=False encoder the batch is dim 1, for the
    attention (which works batch-first inside) and for the feed-forward layers (sample_mode(batch=N)). Same
    weights and noise streams as its batch-first twin: the same predictions."""
    torch.manual_seed(5)
    seq = TinyViT(batch_first=False)
    convert.to_mean_field(seq, moped=True, moped_delta=0.2)
    convert.to_sws(seq, num_components=4, progress=False)
    twin = copy.deepcopy(seq)  # same rng ids, so the same noise
    twin.batch_first = True
    for layer in twin.encoder.layers:
        layer.self_attn.batch_first = True
    x = torch.randn(3, 3, 8, 8, generator=rng)
    seq.eval()
    twin.eval()
    a = sws.predict(seq, x, samples=4, seed=99)
    b = sws.predict(twin, x, samples=4, seed=99)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float((a[0] - a[1]).abs().max()) > 1e-4  # the samples differ
