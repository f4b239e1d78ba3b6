"""The CPU settings that decide a zoo build's floats, pinned for the build's own process.

CPU training is deterministic on one machine with one thread, but the floats it
produces depend on which kernels run: ATen picks its vectorised kernels by CPU
(``ATEN_CPU_CAPABILITY``: AVX-512 machines run other ones than AVX2 machines),
MKL picks its matrix kernels by CPU (``MKL_CBWR``), and a thread count other than
one changes the order of float sums. Over hundreds of training steps, differences
in the last bit grow into other models (``docs/zoo.md`` has the measured spread).
These settings are read when torch loads, so :func:`curvlens.zoo.build.build` runs
the build in a fresh interpreter (:mod:`curvlens.zoo.worker`) whose environment
:func:`build_environment` pins, whatever the calling process has set.
"""
from __future__ import annotations

#: The settings every build runs under (besides ATEN_CPU_CAPABILITY and MKL_CBWR,
#: which :func:`build_environment` sets from the machine's capability).
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def build_environment(avx2: bool) -> dict[str, str]:
    """The environment a build runs under, given whether the CPU has AVX2
    (:func:`curvlens.runtime.cpu_has_avx2`).

    On an x86 CPU with AVX2 or better, ATen's AVX2 kernels and MKL's AVX2 code
    path are pinned, so an AVX-512 machine computes what an AVX2 machine does.
    Other CPUs keep their own kernels (there is no common path to pin to; ATen
    does not check that a requested capability exists, so AVX2 is never requested
    there) and MKL, where present, its conditional-reproducibility path.

    Examples
    --------
    >>> build_environment(True)["ATEN_CPU_CAPABILITY"], build_environment(True)["MKL_CBWR"]
    ('avx2', 'AVX2')
    >>> "ATEN_CPU_CAPABILITY" in build_environment(False)
    False
    """
    env = dict(PINNED)
    if avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    else:
        env["MKL_CBWR"] = "COMPATIBLE"
    return env

