# Type stubs for the compiled kernel in _grouping.c (see there and _codec.py).
from collections.abc import Sequence

from typing_extensions import Buffer

def split_joint(
    src: Buffer,
    width: int,
    k: int,
    lo: int,
    plane_a: Buffer,
    plane_b: Buffer,
    rest: Sequence[Buffer],
    escapes: Buffer,
) -> int: ...
def split_planes(src: Buffer, width: int, planes: Sequence[Buffer]) -> None: ...
def count_escapes(plane_a: Buffer, k: int) -> int: ...
def merge_joint(
    out: Buffer,
    width: int,
    k: int,
    lo: int,
    plane_a: Buffer,
    plane_b: Buffer,
    rest: Sequence[Buffer],
    escapes: Buffer,
) -> None: ...
def merge_planes(out: Buffer, width: int, planes: Sequence[Buffer]) -> None: ...
