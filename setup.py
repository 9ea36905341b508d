"""Builds the optional nghttp2 engine (kom_gateway/http/_nghttp2.pyx), as aiohttp builds
its llhttp parser: compiled when it can be, skipped with a warning when it cannot (no
compiler, no libnghttp2), and the package then runs on the pure-Python `h2` engine.

The extension declares the part of libnghttp2's ABI it uses itself and links the runtime
library `libnghttp2.so.14` (installed wherever curl is), so no -dev package is needed.
KOM_GATEWAY_NO_EXTENSIONS=1 skips it (to test the portable install).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("KOM_GATEWAY_NO_EXTENSIONS"):
    try:
        from Cython.Build import cythonize
    except ImportError:  # building without Cython (e.g. no build isolation): h2 only
        print("kom-gateway: Cython is not installed; the nghttp2 engine is not built")
    else:
        ext_modules = cythonize(
            [
                Extension(
                    "kom_gateway.http._nghttp2",
                    ["kom_gateway/http/_nghttp2.pyx"],
                    extra_compile_args=["-O2"],
                    extra_link_args=["-l:libnghttp2.so.14"],
                    optional=True,
                )
            ],
            compiler_directives={"language_level": "3"},
        )

setup(ext_modules=ext_modules)
