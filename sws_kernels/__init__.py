"""sws_kernels: fused kernels for Bayesian neural networks with stochastic weight sharing (SWS).

Import never fails: without the compiled module, without CUDA or without Triton, every op falls back to
the pure-PyTorch reference; :func:`backends` says which backend is available and why not.
"""
from . import philox, reference  # noqa: F401
from ._backend import backend, backends  # noqa: F401
from ._checks import validate  # noqa: F401  (every check on every call, like SWS_VALIDATE=1)
from . import functional  # noqa: F401  (imports the op catalogue)
from . import nn, metrics, convert  # noqa: F401
from .bayes import elbo_loss, kl_loss, predict  # noqa: F401
from .io import load, save  # noqa: F401

__version__ = "0.1.0"
_LAZY = ("demo", "cli", "bench", "plots", "distributed")  # imported on first use: `sws_kernels.demo.digits_cnn()`


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["philox", "reference", "functional", "backend", "backends", "__version__", "nn", "metrics", "convert",
           "kl_loss", "elbo_loss", "predict", "save", "load", "validate"]
