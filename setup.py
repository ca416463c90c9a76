"""Build script for fastkd.

The compiled extension ``fastkd._C`` (``csrc/``) is built against the torch that is already
installed, so install with ``pip install --no-build-isolation -e .``: build isolation would pull
a fresh (CUDA, several GB) torch into the build environment.

Knobs:
  FASTKD_SKIP_EXT=1   build the pure-Python package only (fastkd works, slower, without _C).
  MAX_JOBS=N          parallel compile jobs (default: from CPU count and free memory).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs() -> int:
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gib = int(info["MemAvailable"].split()[0]) / 2**20
        by_mem = max(1, int(free_gib // 2))  # ~2 GiB per translation unit of ATen code
    except (OSError, KeyError, ValueError):
        by_mem = cpus
    return max(1, min(cpus, by_mem))


def _extensions():
    if os.environ.get("FASTKD_SKIP_EXT", "0") == "1":
        print("fastkd: FASTKD_SKIP_EXT=1, not building fastkd._C", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastkd: torch is not importable, not building fastkd._C "
              "(install torch first, then pip install --no-build-isolation -e .)", file=sys.stderr)
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # -fno-trapping-math / -fno-math-errno (as torch's own build) let gcc vectorise the fused passes
    # selects; no -ffast-math: the mask's float mapping and the reductions stay exact IEEE.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    # The extension is built where it runs (`pip install -e .`, `make setup`): let gcc use this CPU's
    # vector units (AVX2/AVX-512) in the transforms and fused passes. FASTKD_NATIVE=0 builds for the
    # baseline x86-64 (SSE2) instead, e.g. for a binary shipped to other machines.
    if os.environ.get("FASTKD_NATIVE", "1") != "0":
        cxx.append("-march=native")
    ext = CppExtension(
        name="fastkd._C",
        sources=sources,
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastkd",
    version="0.1.0",
    description="Fast feature knowledge distillation (MGD, CT, logit KD) for vision models",
    python_requires=">=3.10",
    # configs/ (recipes, the demos' configs, DeepSpeed presets) ships inside the package as fastkd/configs,
    # read through fastkd.resources; a source checkout reads its own configs/ (the top level stays as it is)
    packages=[*find_packages(include=["fastkd", "fastkd.*"]), "fastkd.configs"],
    package_dir={"fastkd.configs": "configs"},
    package_data={"fastkd": ["py.typed", "ops/triton_tuning.json"], "fastkd.configs": ["**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is required but not pinned here: the Makefile installs the right build for the machine,
    # and a looser pin resolved by pip would pull a multi-GB CUDA build.
    install_requires=["numpy", "pyyaml", "pydantic>=2", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "deepspeed": ["deepspeed>=0.15"],
        "ffcv": ["ffcv==1.0.2", "pillow", "opencv-python"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.cli:main"]},
)
