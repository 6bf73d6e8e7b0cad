"""sws_kernels.metrics validates its inputs: probabilities, never logits (issue 17, item 4)."""
import pytest
import torch

from sws_kernels import metrics as M
from sws_kernels import reference as R

METRICS = [("accuracy", True), ("nll", True), ("ece", True), ("brier", True), ("predictive_entropy", False),
           ("mutual_information", False), ("bma", False)]


def _call(name, with_target, probs, target):
    fn = getattr(M, name)
    return fn(probs, target) if with_target else fn(probs)


def _data(S=5, B=17, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(S, B, C, generator=g)
    return logits, logits.softmax(-1), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("name, with_target", METRICS)
def test_probabilities_pass_and_match_the_reference(name, with_target):
    _, probs, target = _data()
    got = _call(name, with_target, probs, target)
    ref = getattr(R, name)(probs, target) if with_target else getattr(R, name)(probs)
    torch.testing.assert_close(got, ref)
    if name != "mutual_information":  # averaged [B, C] probabilities are accepted as well
        p = probs.mean(0)
        ref = getattr(R, name)(p, target) if with_target else getattr(R, name)(p)
        torch.testing.assert_close(_call(name, with_target, p, target), ref)


@pytest.mark.parametrize("name, with_target", METRICS)
def test_logits_raise_and_suggest_softmax(name, with_target):
    logits, _, target = _data(seed=1)
    with pytest.raises(ValueError, match=r"probs: .*\[0, 1\].*softmax\(-1\)"):
        _call(name, with_target, logits, target)


@pytest.mark.parametrize("bad, what", [
    (lambda p: p * 1.05, "sums"),                                    # in [0, 1] but not normalised
    (lambda p: torch.cat([p[..., :1] - 0.01, p[..., 1:] + 0.01 / (p.shape[-1] - 1)], -1), r"\[0, 1\]"),  # negative
    (lambda p: p.clone().index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan"))), "finite"),
])
def test_not_probabilities_raise(bad, what):
    _, probs, target = _data(seed=2)
    with pytest.raises(ValueError, match=what):
        M.nll(bad(probs), target)


def test_tolerance_follows_the_dtype():
    _, probs, target = _data(seed=3)
    # softmax in half precision sums to 1 only within its rounding: accepted
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        M.ece(probs.to(dt), target)
    # an fp32 row off by 1e-2 is not rounding
    off = probs.clone()
    off[0, 0] *= 1.5
    with pytest.raises(ValueError, match="sums"):
        M.brier(off, target)


def test_wrong_types_and_shapes():
    _, probs, target = _data()
    with pytest.raises(TypeError, match="probs"):
        M.accuracy(probs.numpy(), target)
    with pytest.raises(TypeError, match="floating"):
        M.accuracy((probs > 0.5).long(), target)
    with pytest.raises(ValueError, match="shape"):
        M.accuracy(probs[0, 0], target)
    with pytest.raises(ValueError, match="target"):
        M.nll(probs, target[:-1])
