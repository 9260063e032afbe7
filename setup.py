"""The optional compiled part of streamtotal: the fused CPU kernels of the likelihoods and two layers.

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C compiler, no
OpenMP), the install still succeeds and streamtotal computes the likelihood with torch operations instead
(streamtotal/model/native/__init__.py says which path is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streamtotal.model.native._cpu_kernels",
            sources=["streamtotal/model/native/nb_kernel.c", "streamtotal/model/native/protein_kernel.c",
                     "streamtotal/model/native/layer_kernel.c", "streamtotal/model/native/nb_module.c"],
            # -ffast-math lets GCC call glibc's vectorised exp/log; the RNA kernel checks counts from their bits.
            extra_compile_args=["-O3", "-ffast-math", "-fopenmp", "-std=c11"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],  # with -ffast-math, glibc's libmvec (vectorised expf/logf), which libm pulls in
            optional=True,
        )
    ]
)
