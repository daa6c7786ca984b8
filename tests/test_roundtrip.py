"""Property: any nested state round-trips through save/load bit for bit.

Random states cover every type the issue lists, every dtype torch can view as bytes,
0-dim and zero-size shapes, transposed / stepped / channels_last strides, and aliasing
(the same tensor twice, a slice of another, a transposed view of another, a view of
another under a different dtype, a conjugate view), with -0.0, NaN payloads and
subnormals planted in the bytes. Expected values are the inputs themselves, compared
as raw bytes; the safetensors library reads the payload as an independent check.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import ckptstore
from ckptstore._tree import flatten


def _byte_viewable_dtypes() -> list[torch.dtype]:
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 and quantized dtypes warn
        for name in dir(torch):
            dtype = getattr(torch, name)
            if not isinstance(dtype, torch.dtype):
                continue
            try:
                probe = torch.empty(4, dtype=dtype)
                probe.view(torch.uint8)
            except (RuntimeError, TypeError, NotImplementedError):
                continue
            if probe.is_quantized:  # carries scale/zero point beyond its bytes: refused
                continue
            found.add(dtype)
    return sorted(found, key=str)


DTYPES = _byte_viewable_dtypes()
SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def test_the_dtype_list_covers_what_the_issue_names() -> None:
    named = ["float32", "float16", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
    named += ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    named += ["bool", "complex64", "complex128"]
    assert {getattr(torch, n) for n in named} <= set(DTYPES)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's values as bytes in logical order (no copy kernel of its dtype used)."""
    t = t.resolve_conj().resolve_neg()
    if t.element_size() in SAME_SIZE_INT:
        t = t.view(SAME_SIZE_INT[t.element_size()])
    return t.reshape(-1).numpy().tobytes()  # numpy walks any strides


def special_patterns(size: int) -> list[bytes]:
    """Little-endian bit patterns: -0.0, the smallest subnormal, NaNs with payloads."""
    top = 8 * size - 1
    values = [1 << top, 1, (1 << top) - 2, (1 << top) | 0x5, (1 << (top + 1)) - 1]
    return [v.to_bytes(size, "little") for v in values]


@st.composite
def byte_buffers(draw: st.DrawFn, nbytes: int, itemsize: int) -> torch.Tensor:
    seed = draw(st.integers(0, 2**32 - 1))
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    n = nbytes // itemsize
    if n:
        patterns = special_patterns(itemsize)
        plants = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(patterns))))
        for index, pattern in plants:
            data[index * itemsize : (index + 1) * itemsize] = torch.tensor(list(pattern))
    return data


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    size = torch.empty(0, dtype=dtype).element_size()
    layout = draw(st.sampled_from(["contiguous", "transposed", "stepped", "channels_last"]))
    if layout == "channels_last":
        shape = draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))
    else:
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    if layout == "stepped" and not shape:
        layout = "contiguous"
    base_shape = list(shape)
    if layout == "stepped":
        base_shape[0] = 2 * shape[0] + 1
    elif layout == "transposed":
        base_shape = base_shape[::-1]
    elif layout == "channels_last":
        base_shape = [shape[0], shape[2], shape[3], shape[1]]
    numel = math.prod(base_shape)
    base = draw(byte_buffers(numel * size, size)).view(dtype).view(base_shape)
    if layout == "stepped":
        return base[::2]
    if layout == "transposed":
        return base.permute(tuple(reversed(range(base.dim()))))
    if layout == "channels_last":
        return base.permute(0, 3, 1, 2)
    return base


def alias_of(x: torch.Tensor, how: str, dtype: torch.dtype) -> torch.Tensor:
    """A view sharing x's storage; falls back to x itself when the view is impossible."""
    try:
        if how == "slice" and x.dim() and x.shape[0] > 1:
            return x[1:]
        if how == "transpose" and x.dim() >= 2:
            return x.transpose(0, 1)
        if how == "dtype_view" and x.dim():
            return x.view(dtype)
        if how == "conj" and x.is_complex():
            return x.conj()
    except RuntimeError:
        pass
    return x


@st.composite
def tensor_pools(draw: st.DrawFn) -> list[torch.Tensor]:
    pool = draw(st.lists(tensors(), min_size=1, max_size=4))
    for _ in range(draw(st.integers(0, 3))):
        source = pool[draw(st.integers(0, len(pool) - 1))]
        how = draw(st.sampled_from(["same", "slice", "transpose", "dtype_view", "conj"]))
        pool.append(alias_of(source, how, draw(st.sampled_from(DTYPES))))
    return pool


NUMPY_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]
NUMPY_DTYPES += [np.uint32, np.uint64, np.float16, np.float32, np.float64]
NUMPY_DTYPES += [np.complex64, np.complex128]


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    data = draw(byte_buffers(math.prod(shape) * dtype.itemsize, dtype.itemsize))
    array = data.numpy().view(dtype).reshape(shape)
    if dtype == np.bool_:
        array = np.asarray(array.view(np.uint8) % 2 == 1)  # valid bools, still an array
    how = draw(st.sampled_from(["as is", "transposed", "reversed"]))
    if how == "transposed":
        return array.T
    if how == "reversed" and array.ndim:
        return array[::-1]
    return array


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 5e-324])
plain = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats | st.text(max_size=8)
str_keys = st.text(alphabet="ab/~#0", max_size=4)
int_keys = st.integers(-3, 3)


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(str_keys, children, max_size=3),
            st.dictionaries(int_keys | str_keys, children, max_size=3),
            st.dictionaries(str_keys, children, max_size=3).map(OrderedDict),
            st.dictionaries(int_keys, st.integers(-5, 5), max_size=3).map(Counter),
        )

    return st.recursive(leaves, extend, max_leaves=8)


@st.composite
def states(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(tensor_pools())
    refs = st.integers(0, len(pool) - 1).map(lambda i: pool[i])
    state: dict[str, Any] = {f"t{i}": t for i, t in enumerate(pool)}
    state["tree"] = draw(trees(plain | refs | ndarrays()))
    return state


def assert_same(got: Any, want: Any, path: str = "state") -> None:
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.device.type == "cpu" and not got.is_conj() and not got.is_neg(), path
        assert raw_bytes(got) == raw_bytes(want.resolve_conj().resolve_neg()), path
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want) or (
            math.isnan(got) and math.isnan(want)
        ), path
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        assert [type(k) for k in got] == [type(k) for k in want], path
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    else:
        assert got == want, path


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@given(state=states())
def test_random_states_roundtrip_bit_exactly(state: dict[str, Any], tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.mktemp("rt")) / "ckpt"
    before = {k: raw_bytes(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    versions = {k: v._version for k, v in state.items() if isinstance(v, torch.Tensor)}

    ckptstore.save(path, state, step=3)
    loaded = ckptstore.load(path)

    assert_same(loaded, state)
    for key, tensor in state.items():  # the caller's tensors are untouched
        if isinstance(tensor, torch.Tensor):
            assert raw_bytes(tensor) == before[key] and tensor._version == versions[key]
    _assert_sharing_kept(state, loaded)
    _assert_safetensors_reads_the_payload(path, state)


def _assert_sharing_kept(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            x, y = state[a], state[b]
            if x.is_conj() or x.is_neg() or y.is_conj() or y.is_neg():
                continue  # materialised: a copy of its own
            if _shares_storage(x, y):
                assert _shares_storage(loaded[a], loaded[b]), (a, b)


def _assert_safetensors_reads_the_payload(path: Path, state: dict[str, Any]) -> None:
    """The payload is a plain .safetensors file: a tensor alone on its storage appears
    under its own name with its own bytes, and every typed entry is aligned."""
    payload = path / "payload.safetensors"
    stored = load_file(str(payload))
    (size,) = struct.unpack("<Q", payload.read_bytes()[:8])
    header = json.loads(payload.read_bytes()[8 : 8 + size])
    for name, info in header.items():
        if name != "__metadata__" and stored[name].numel():
            assert info["data_offsets"][0] % stored[name].element_size() == 0, name
    _, leaves = flatten(state)
    for leaf in leaves:
        t = leaf.tensor
        alone = sum(_shares_storage(t, other.tensor) for other in leaves) <= 1
        if alone and t.numel() and leaf.name in stored:
            assert raw_bytes(stored[leaf.name]) == raw_bytes(t.resolve_conj().resolve_neg())
