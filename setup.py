"""Builds the C extension ``kvrack._native``; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvrack._native",
            sources=["native/kvrack_native.c", "native/cxl_index.c"],
            depends=["native/kvrack_native.h"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
