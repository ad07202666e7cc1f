"""Build and install fastgan.

The C++ library ``fastgan._C`` is always built for the CPU. Its CUDA kernels are
compiled in as well when a CUDA toolkit (``nvcc`` via ``CUDA_HOME``) and a
CUDA-enabled torch are both present; set ``FASTGAN_BUILD_CUDA=0`` to skip them
and ``FASTGAN_BUILD_CPP=0`` to skip the extension entirely (fastgan then runs
on its Triton and reference paths). ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures; by default the visible GPUs', or Hopper when none is visible, with
Hopper built as ``9.0a`` (sm_90a: H100/H200).

Install with ``pip install --no-build-isolation -e .`` so the extension is
compiled against the torch that is already installed.
"""
import glob
import os
import platform
import sys

from setuptools import setup

PACKAGES = ["fastgan", "fastgan.ops", "fastgan.reference", "fastgan.nn", "fastgan.metrics", "fastgan.kernels", "fastgan.train", "fastgan.models"]


def _flag(name, default="1"):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _pip_cuda_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include, ...): the toolkit on a
    build machine may lack some (cuBLAS, cuSPARSE) that torch's headers include."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include")))
    return dirs[:1]


def _default_cuda_archs(torch):
    """The visible GPUs' architectures, else Hopper; Hopper as sm_90a (its arch-specific
    SASS, which the resource-usage check in tests/test_hopper_compile.py reads)."""
    archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(a + "a" if a == "9.0" else a for a in archs or ["9.0"])


def _extensions():
    if not _flag("FASTGAN_BUILD_CPP"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-fopenmp", "-fopenmp-simd"]
    # The shared C++ runtime, by file name: torch's. A toolchain whose own lib folder holds only
    # libstdc++.a (the H100 machine's CXX=/opt/gcc/bin/g++) otherwise links a private static copy whose
    # locale is never set up, and the first TORCH_CHECK message formatted in the library crashed the
    # process (SIGSEGV in std::ostream) instead of raising.
    link = ["-fopenmp", "-l:libstdc++.so.6"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    build_cuda = (
        _flag("FASTGAN_BUILD_CUDA")
        and bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs(torch)
        ext = cpp_extension.CUDAExtension(
            "fastgan._C",
            sources + cuda_sources,
            include_dirs=[os.path.abspath("csrc")] + _pip_cuda_include_dirs(),
            define_macros=[("FASTGAN_WITH_CUDA", "1")],
            # No --use_fast_math: it flushed float32 denormals to zero (a sample's tiny squared gradient
            # norm became 0, which the penalty's backward treats as degenerate) where the CPU kernels keep them.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastgan._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    if platform.system() == "Darwin":
        ext.extra_compile_args["cxx"] = [f for f in cxx if "openmp" not in f]
        ext.extra_link_args = []
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastgan",
    version="0.1.0",
    description="Fused kernels for training and evaluating GANs in PyTorch",
    packages=PACKAGES,
    package_dir={"fastgan.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "pillow", "tqdm"],
    extras_require={
        # reference training: YAML configs, the embedded digits, TensorBoard scalars, loss/FID plots
        "train": ["pyyaml", "scikit-learn", "tensorboard", "matplotlib"],
        "test": ["pytest", "scipy", "pyyaml", "scikit-learn", "tensorboard", "matplotlib"],
        "bench": ["pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
