"""fastgan: fused kernels for training and evaluating GANs in PyTorch.

``import fastgan`` registers the ``fastgan::*`` ops with ``torch.library``.
``fastgan.backends()`` reports which kernels are built and usable here;
``fastgan.use_backend(name)`` (or ``FASTGAN_BACKEND``) forces one.
``fastgan.graphs.GraphedStep`` replays a whole hand-written training update from a CUDA graph.
"""
import importlib
import sys

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "use_backend", "ops", "nn", "penalties", "graphs", "__version__"]

_SUBMODULES = ("ops", "nn", "penalties", "graphs")
_BACKEND_NAMES = ("BACKENDS", "backends", "use_backend")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastgan.{name}")
    if name in _BACKEND_NAMES:
        return getattr(importlib.import_module("fastgan._backend"), name)
    raise AttributeError(f"module 'fastgan' has no attribute {name!r}")


def _imported_to_run_the_cli() -> bool:
    """Whether Python imports this package to run `python -m fastgan`: the CLI then imports
    torch and the ops only for the commands that need them, so `--help` answers at once."""
    if sys.argv[:1] != ["-m"]:
        return False
    # argv[0] is "-m" while -m locates ANY module, e.g. `python -m mygan` whose package imports
    # fastgan, and that import must register the ops. Until then argv is ["-m", *the module's
    # arguments], so the word before those in orig_argv names the module ("-mfastgan" if joined).
    if len(sys.argv) >= len(sys.orig_argv):
        return False
    target = sys.orig_argv[len(sys.orig_argv) - len(sys.argv)]
    if target.startswith("-"):
        target = target.partition("m")[2]
    return target in ("fastgan", "fastgan.__main__")


# Every other import registers the ops here, as documented.
if not _imported_to_run_the_cli():
    from fastgan._backend import BACKENDS, backends, use_backend
    from fastgan import ops, nn, penalties, graphs
