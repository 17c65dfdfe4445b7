"""Build and install rto_fast: `pip install .` or `pip install -e .` (add `[test]` / `[bench]` for the extras).

The package is `rto_fast/`, its Triton kernels in `rto_fast/kernels/` (never a top-level `kernels`, which would
shadow the Hub package transformers imports); `csrc/*.cpp` builds with pybind11 into `rto_fast._C`. A failed C++
build fails the install: there is no silent fallback.
"""

import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
extensions = [
    Pybind11Extension(
        "rto_fast._C",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),
        cxx_std=17,
        # No fast-math and no FMA contraction: the SSE2 and AVX2 copies of csrc/logprobs.cpp round identically.
        extra_compile_args=["-O3", "-ffp-contract=off", *openmp],
        extra_link_args=openmp,
    )
]

setup(
    name="rto_fast",
    version="0.1.0",
    description="Fast Reinforced Token Optimization (RTO) for RLHF: fused Triton ops and a lean trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rto_fast", "rto_fast.*"]),
    package_data={"rto_fast": ["assets/tokenizer/*"]},
    ext_modules=extensions,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        # The oldest releases the test suite has passed on (datasets 4.x cannot read JSON columns of mixed types).
        "transformers>=4.57",
        "datasets>=5.0",
        "deepspeed>=0.15",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs two processes (-n 2).
        "test": ["pytest>=8", "pytest-xdist", "trl", "liger-kernel", "pybind11>=2.12", "wheel", "tensorboard", "wandb",
                 "peft>=0.15"],
        "bench": ["trl", "liger-kernel"],
        "trackers": ["tensorboard", "wandb"],  # runtime.report_to
        "lora": ["peft>=0.15"],  # model.lora_rank
    },
    zip_safe=False,
)
