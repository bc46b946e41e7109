"""Build the compiled data plane.

Every ``softnic/*.pyx`` and ``vhost/*.pyx`` becomes its own extension module, so a new
component needs no edit here. The crypto engines are C (``softnic/csrc``) because both
libraries expose their fast calls as C macros; they are compiled into ``softnic._crypto``.
intel-ipsec-mb is optional: when its header is absent the build defines no
``SN_HAVE_IPSEC_MB`` and every SA uses OpenSSL libcrypto.
"""

import glob
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("softnic", "csrc")


def have_ipsec_mb() -> bool:
    if os.environ.get("SOFTNIC_NO_IPSEC_MB"):
        return False
    return any(
        os.path.exists(os.path.join(d, "intel-ipsec-mb.h"))
        for d in ("/usr/include", "/usr/local/include")
    )


def extensions() -> list[Extension]:
    macros: list[tuple[str, str | None]] = [("NPY_NO_DEPRECATED_API", None)]
    libs = ["crypto"]
    if have_ipsec_mb():
        macros.append(("SN_HAVE_IPSEC_MB", "1"))
        libs.append("IPSec_MB")
    cflags = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
    sanitize = os.environ.get("SOFTNIC_SANITIZE")  # e.g. "address,undefined"
    ldflags: list[str] = []
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
        ldflags += [f"-fsanitize={sanitize}"]
    exts = []
    for pyx in sorted(glob.glob("softnic/*.pyx") + glob.glob("vhost/*.pyx")):
        name = pyx[:-4].replace(os.sep, ".")
        sources = [pyx]
        if name == "softnic._crypto":
            sources += sorted(glob.glob(os.path.join(CSRC, "*.c")))
        exts.append(
            Extension(
                name,
                sources,
                include_dirs=[CSRC],
                define_macros=macros,
                libraries=libs,
                extra_compile_args=cflags,
                extra_link_args=ldflags,
            )
        )
    return exts


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    setup(
        ext_modules=cythonize(
            extensions(),
            language_level=3,
            include_path=["."],
            compiler_directives={
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "initializedcheck": False,
            },
            nthreads=0,
        ),
    )
