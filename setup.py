"""Build the optional compiled codec kernel; everything else is in pyproject.toml.

`optional=True`: where no C compiler is found the install still succeeds and the codec
uses its numpy implementation (same bytes, slower); `ckptstore --version` says
which one is in use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckptstore._grouping",
            ["ckptstore/_grouping.c"],
            # no FMA contraction: the sampled entropy must round as the numpy fallback's does
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
