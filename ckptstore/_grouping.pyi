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
    packed: bool = False,  # plane_b bit-packed (bg2j2p, bg4j2p): unpacked as it is merged
) -> None: ...
def merge_planes(out: Buffer, width: int, planes: Sequence[Buffer]) -> None: ...
def pack6(values: Buffer, out: Buffer) -> None: ...
def unpack6(packed: Buffer, out: Buffer) -> None: ...
def sampled_bits(plane: Buffer, stride: int) -> float: ...
def top_histogram(src: Buffer, width: int, stride: int, counts: Buffer) -> None: ...
