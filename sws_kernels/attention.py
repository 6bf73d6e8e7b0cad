"""Bayesian multi-head attention: nn.MultiheadAttention with its projections sampled by our kernels.

:func:`sws_kernels.convert.to_mean_field` puts a :class:`BayesianMultiheadAttention` in place of every
``nn.MultiheadAttention``: the q/k/v projections (one packed ``in_proj`` [3E, E] when query, key and value
share the embedding size, as PyTorch's ``in_proj_weight``; else ``q_proj``, ``k_proj``, ``v_proj`` for
``kdim``/``vdim``) and ``out_proj`` become :class:`sws_kernels.nn.MeanFieldLinear` layers, which
:func:`sws_kernels.convert.to_sws` later turns into :class:`sws_kernels.nn.SWSLinear` layers like any
other (the attention module only calls its projection submodules). The attention itself runs through
``F.scaled_dot_product_attention``; with ``need_weights=True`` the weights are computed explicitly
(softmax(q k^T / sqrt(d) + mask), dropout, then times v), as nn.MultiheadAttention returns them.

Forward has nn.MultiheadAttention's signature and semantics: ``(query, key, value, key_padding_mask=None,
need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False) -> (out, weights or None)``,
``batch_first``, unbatched inputs, boolean (True = masked) or float (added) masks, ``add_bias_kv``,
``add_zero_attn`` and dropout on the attention weights in training. The projections carry
``dnn_to_bnn_flag`` and are called with ``return_kl=False``; their KL is counted by ``sws.kl_loss`` and
bayesian-torch's ``get_kl_loss`` through the projection modules themselves.

Transformer fast path: nn.TransformerEncoderLayer / nn.TransformerEncoder run a fused kernel in eval mode
that reads ``self_attn.in_proj_weight``, ``out_proj.weight`` and ``linear1.weight`` directly, i.e. the
deterministic tensors, which a Bayesian model does not have. Their first module-dependent fast-path
condition is ``self_attn.in_proj_bias is None``: this module's ``in_proj_bias`` is always None (the biases
live in the Bayesian projections) and it has no ``in_proj_weight`` at all, so the fast path is never taken
and could not silently use stale weights. ``to_mean_field`` also sets ``use_nested_tensor = False`` on
every nn.TransformerEncoder whose layers it converts (PyTorch sets it so for a bias-free attention).

Sample folding (:func:`sws_kernels.nn.sample_mode`, :func:`sws_kernels.predict`): the module works in the
batch-first layout internally, so each projection sees the S folded samples along dim 0 whatever
``batch_first`` says; masks given for the unfolded batch N are repeated for the S*N folded batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from . import nn as _snn
from .nn import MeanFieldLinear

__all__ = ["BayesianMultiheadAttention"]


def _float_mask(mask, name: str, dtype):
    """nn.MultiheadAttention's mask convention: bool True = not allowed (-inf), float = added."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected None or a tensor, got {_checks.describe(mask)}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name}: expected a bool or floating mask, got {_checks.describe(mask)}")
    return mask.to(dtype)


class BayesianMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with Bayesian projections (see the module docstring).

    Constructor: nn.MultiheadAttention's arguments, then the mean-field prior and init of
    :class:`sws_kernels.nn.MeanFieldLinear` (``prior_mean``, ``prior_variance`` = prior standard deviation,
    ``posterior_mu_init``, ``posterior_rho_init``). ``bias_k``/``bias_v`` (``add_bias_kv``) stay
    deterministic parameters, like every bias-like tensor nn.MultiheadAttention keeps outside its
    projections. :meth:`from_torch` converts a trained nn.MultiheadAttention.
    """

    # Always None (see the module docstring): makes nn.TransformerEncoder(Layer) skip its fused fast path,
    # which would read deterministic packed weights this module does not have.
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, prior_mean: float = 0.0,
                 prior_variance: float = 1.0, posterior_mu_init: float = 0.0, posterior_rho_init: float = -3.0):
        super().__init__()
        E = _snn._positive_int(embed_dim, "embed_dim")
        H = _snn._positive_int(num_heads, "num_heads")
        if E % H:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={E}, got {H}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = E, H, E // H
        self.kdim = E if kdim is None else _snn._positive_int(kdim, "kdim")
        self.vdim = E if vdim is None else _snn._positive_int(vdim, "vdim")
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        prior = (prior_mean, prior_variance, posterior_mu_init, posterior_rho_init, bool(bias))
        if self._qkv_same_embed_dim:
            self.in_proj = MeanFieldLinear(E, 3 * E, *prior)
            projections = [self.in_proj]
        else:
            self.q_proj = MeanFieldLinear(E, E, *prior)
            self.k_proj = MeanFieldLinear(self.kdim, E, *prior)
            self.v_proj = MeanFieldLinear(self.vdim, E, *prior)
            projections = [self.q_proj, self.k_proj, self.v_proj]
        self.out_proj = MeanFieldLinear(E, E, *prior)
        for p in projections + [self.out_proj]:
            p.dnn_to_bnn_flag = True  # they return only the output inside this module
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, E).normal_(0, 0.02))
            self.bias_v = nn.Parameter(torch.empty(1, 1, E).normal_(0, 0.02))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention, prior_mean: float = 0.0, prior_variance: float = 1.0,
                   posterior_mu_init: float = 0.0, posterior_rho_init: float = -3.0, *, moped: bool = False,
                   moped_delta: float = 0.1, rho_from_delta=None) -> "BayesianMultiheadAttention":
        """The Bayesian counterpart of ``m`` (same hyper-parameters, device, train/eval mode). With ``moped``,
        mu = m's projection weights and biases and sigma = moped_delta * |w| (``rho_from_delta(w, delta)``);
        ``bias_k``/``bias_v`` are copied either way."""
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"m: expected a torch.nn.MultiheadAttention, got {_checks.describe(m)}")
        has_bias = m.in_proj_bias is not None
        new = cls(m.embed_dim, m.num_heads, m.dropout, has_bias, m.bias_k is not None, m.add_zero_attn, m.kdim,
                  m.vdim, m.batch_first, prior_mean, prior_variance, posterior_mu_init, posterior_rho_init)
        dev = m.out_proj.weight.device
        new = new.to(dev)
        E = m.embed_dim
        if m._qkv_same_embed_dim:
            pairs = [(new.in_proj, m.in_proj_weight, m.in_proj_bias)]
        else:
            b = [None] * 3 if not has_bias else list(m.in_proj_bias.split(E))
            pairs = [(new.q_proj, m.q_proj_weight, b[0]), (new.k_proj, m.k_proj_weight, b[1]),
                     (new.v_proj, m.v_proj_weight, b[2])]
        pairs.append((new.out_proj, m.out_proj.weight, m.out_proj.bias))
        with torch.no_grad():
            if moped:
                for layer, w, b in pairs:
                    layer.weight_mu.copy_(w)
                    layer.weight_rho.copy_(rho_from_delta(w, moped_delta))
                    if b is not None:
                        layer.mu_bias.copy_(b)
                        layer.rho_bias.copy_(rho_from_delta(b, moped_delta))
            if m.bias_k is not None:
                new.bias_k.copy_(m.bias_k)
                new.bias_v.copy_(m.bias_v)
        new.train(m.training)
        return new

    def projections(self):
        """The Bayesian projection layers, in the order q/k/v (or packed in_proj), out."""
        if self._qkv_same_embed_dim:
            return [self.in_proj, self.out_proj]
        return [self.q_proj, self.k_proj, self.v_proj, self.out_proj]

    def _project(self, query, key, value, same_qkv: bool, same_kv: bool):
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            return (self.q_proj(query, return_kl=False), self.k_proj(key, return_kl=False),
                    self.v_proj(value, return_kl=False))
        W = self.in_proj
        if same_qkv:  # self-attention: one call of the packed projection
            return W(query, return_kl=False).chunk(3, -1)
        # Cross-attention: each input through the packed layer, keeping its own part. Every call draws a
        # fresh weight sample (the same one inside sample_mode, which shares the seed).
        q = W(query, return_kl=False)[..., :E]
        if same_kv:
            k, v = W(key, return_kl=False)[..., E:].chunk(2, -1)
        else:
            k = W(key, return_kl=False)[..., E:2 * E]
            v = W(value, return_kl=False)[..., 2 * E:]
        return q, k, v

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            _checks.tensor(t, name, floating=True)
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query/key/value: expected all 3-D (batched) or all 2-D (unbatched), got "
                             f"{_checks.describe(query)}, {_checks.describe(key)}, {_checks.describe(value)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal: True is a hint that attn_mask is the causal mask (as in "
                             "nn.MultiheadAttention); expected attn_mask, got None")
        same_qkv = query is key and key is value
        same_kv = key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # work batch-first: the projections fold samples along dim 0
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        if E != self.embed_dim:
            raise ValueError(f"query: expected a last dimension of size {self.embed_dim} (embed_dim), got "
                             f"{_checks.describe(query)}")
        H, d = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, same_qkv, same_kv)
        Lk = k.shape[1]
        dt = q.dtype
        attn_mask = _float_mask(attn_mask, "attn_mask", dt)
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", dt)
        fold = _snn._FOLD
        if fold is not None:  # masks written for the unfolded batch N -> the S*N folded batch
            S = fold[0]
            if key_padding_mask is not None and key_padding_mask.shape[0] * S == N:
                key_padding_mask = key_padding_mask.repeat(S, 1)
            if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] * S == N * H:
                attn_mask = attn_mask.repeat(S, 1, 1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(dt).expand(N, 1, E)], 1)
            v = torch.cat([v, self.bias_v.to(dt).expand(N, 1, E)], 1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(N, L, H, d).transpose(1, 2)
        k = k.reshape(N, k.shape[1], H, d).transpose(1, 2)
        v = v.reshape(N, v.shape[1], H, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, d)], 2)
            v = torch.cat([v, v.new_zeros(N, H, 1, d)], 2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        Lk = k.shape[2]
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, Lk):
                    raise ValueError(f"attn_mask: expected shape {(L, Lk)}, got {_checks.describe(attn_mask)}")
                mask = attn_mask.view(1, 1, L, Lk)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (N * H, L, Lk):
                    raise ValueError(f"attn_mask: expected shape {(N * H, L, Lk)}, got {_checks.describe(attn_mask)}")
                mask = attn_mask.view(N, H, L, Lk)
            else:
                raise ValueError(f"attn_mask: expected 2 or 3 dimensions, got {_checks.describe(attn_mask)}")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, Lk):
                raise ValueError(f"key_padding_mask: expected shape {(N, Lk)}, got "
                                 f"{_checks.describe(key_padding_mask)}")
            kpm = key_padding_mask.view(N, 1, 1, Lk)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, -1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            causal_only = is_causal and key_padding_mask is None and self.bias_k is None and not self.add_zero_attn
            out = F.scaled_dot_product_attention(q, k, v, None if causal_only else mask, dropout_p=p,
                                                 is_causal=causal_only)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E), return_kl=False)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}, "
                f"add_bias_kv={self.bias_k is not None}, add_zero_attn={self.add_zero_attn}")
