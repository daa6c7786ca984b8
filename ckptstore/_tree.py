"""Flatten a nested training state into named tensors and a JSON skeleton, and back.

The skeleton is the non-tensor part of the state, written into the manifest as strict
JSON. Every container keeps its type, every dict key keeps its type and order:

    None, bool, str, finite float, int  ->  themselves
    nan / inf / -inf                    ->  {"float": "nan" | "inf" | "-inf"}
    list                                ->  [ ... ]
    tuple                               ->  {"tuple": [ ... ]}
    dict                                ->  {"dict": {"k": v}}, or {"dict": [[k, v], ...]}
                                            when any key is an int
    OrderedDict                         ->  {"odict": ..., "metadata": <its _metadata>}
    Counter                             ->  {"counter": ...}
    torch.Tensor / nn.Parameter         ->  {"tensor": name} / {"parameter": name, ...}
    numpy.ndarray                       ->  {"ndarray": name}

Tensor names are built from the key path and never collide: a str key is escaped
("~" -> "~0", "/" -> "~1", a leading "#" -> "~2"), an int key or a sequence index is
written "#<n>", and segments are joined with "/". So `{"a/b": x}` is "a~1b" while
`{"a": {"b": y}}` is "a/b", and key 0 is "#0" while key "0" is "0".

Anything else (functions, arbitrary objects, subclasses such as namedtuple or
defaultdict, numpy scalars) is refused with the key path named, before anything is
written, because it could only be stored with pickle.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CorruptCheckpointError, UnsupportedValueError

ROOT_NAME = "~root"  # the name of a state that is itself a tensor; "~r" cannot be escaped output
JsonValue = Any


@dataclass(frozen=True)
class Leaf:
    """One tensor of the state, with the name it is stored under."""

    name: str
    tensor: torch.Tensor
    path: str  # for messages: ['model']['fc.weight']


def escape_key(key: str | int) -> str:
    if type(key) is int:
        return f"#{key}"
    text = str(key).replace("~", "~0").replace("/", "~1")
    return "~2" + text[1:] if text.startswith("#") else text


def _join(prefix: str, key: str | int) -> str:
    segment = escape_key(key)
    return f"{prefix}/{segment}" if prefix else segment


def _encode_float(value: float) -> JsonValue:
    if math.isnan(value):
        return {"float": "nan"}
    if math.isinf(value):
        return {"float": "inf" if value > 0 else "-inf"}
    return value


def _decode_float(text: object) -> float:
    if text not in ("nan", "inf", "-inf"):
        raise CorruptCheckpointError(f"unknown float encoding {text!r} in the skeleton")
    return float(str(text))


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._open: set[int] = set()  # containers on the current path: catches cycles

    def node(self, value: Any, name: str, path: str) -> JsonValue:
        kind = type(value)
        if value is None or kind in (bool, str, int):
            return value
        if kind is float:
            return _encode_float(value)
        if isinstance(value, torch.Tensor):
            return self._tensor(value, name, path)
        if kind is np.ndarray:
            return self._ndarray(value, name, path)
        if kind in (list, tuple, dict, OrderedDict, Counter):
            if id(value) in self._open:
                raise UnsupportedValueError(path, "the state contains itself (a cycle)")
            self._open.add(id(value))
            try:
                return self._container(value, name, path)
            finally:
                self._open.discard(id(value))
        raise UnsupportedValueError(
            path,
            f"cannot store a value of type {kind.__module__}.{kind.__qualname__}; "
            "checkpoints hold tensors, numpy arrays, dicts, lists, tuples, OrderedDict, "
            "Counter, str, int, float, bool and None (convert it, or leave it out)",
        )

    def _container(self, value: Any, name: str, path: str) -> JsonValue:
        if type(value) in (list, tuple):
            items = [
                self.node(item, _join(name, i), f"{path}[{i}]") for i, item in enumerate(value)
            ]
            return items if type(value) is list else {"tuple": items}
        body = self._mapping(value, name, path)
        if type(value) is dict:
            return {"dict": body}
        if type(value) is Counter:
            return {"counter": body}
        encoded: dict[str, JsonValue] = {"odict": body}
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            # Module.load_state_dict reads _metadata (per-module versions); keep it.
            # "~m" cannot come out of escape_key, so it collides with no real key.
            meta_name = f"{name}/~m" if name else "~m"
            encoded["metadata"] = self.node(metadata, meta_name, f"{path}._metadata")
        return encoded

    def _mapping(self, value: dict[Any, Any], name: str, path: str) -> JsonValue:
        for key in value:
            if type(key) not in (str, int):
                raise UnsupportedValueError(
                    f"{path}[{key!r}]",
                    f"dict keys must be str or int, not {type(key).__name__}",
                )
        pairs = [(k, self.node(v, _join(name, k), f"{path}[{k!r}]")) for k, v in value.items()]
        if all(type(k) is str for k, _ in pairs):
            return dict(pairs)
        return [[k, v] for k, v in pairs]

    def _tensor(self, value: torch.Tensor, name: str, path: str) -> JsonValue:
        is_parameter = type(value) is torch.nn.Parameter
        if type(value) is not torch.Tensor and not is_parameter:
            raise UnsupportedValueError(
                path, f"tensor subclass {type(value).__qualname__} is not supported"
            )
        if value.layout is not torch.strided:
            raise UnsupportedValueError(
                path, f"{value.layout} tensors are not supported; store .to_dense()"
            )
        if value.is_quantized or value.device.type == "meta":
            raise UnsupportedValueError(path, "quantized and meta tensors are not supported")
        stored_name = name or ROOT_NAME
        self.leaves.append(Leaf(stored_name, value.detach(), path))
        if is_parameter:
            return {"parameter": stored_name, "requires_grad": value.requires_grad}
        return {"tensor": stored_name}

    def _ndarray(self, value: np.ndarray, name: str, path: str) -> JsonValue:
        if value.dtype.kind not in "biufc" or value.dtype.itemsize > 16:
            raise UnsupportedValueError(
                path, f"numpy arrays of dtype {value.dtype} are not supported"
            )
        native = value.astype(value.dtype.newbyteorder("="), copy=False)
        try:
            # Not np.ascontiguousarray: it turns a 0-dim array into shape (1,). numpy calls
            # a one-element a[::-1] contiguous, but torch refuses its negative stride.
            contiguous = np.require(native, requirements="C")
            if any(s < 0 for s in contiguous.strides):
                contiguous = contiguous.copy()
            tensor = torch.from_numpy(contiguous)
        except TypeError as error:
            raise UnsupportedValueError(path, f"numpy dtype {value.dtype}: {error}") from None
        stored_name = name or ROOT_NAME
        self.leaves.append(Leaf(stored_name, tensor, path))
        return {"ndarray": stored_name}


def flatten(state: Any) -> tuple[JsonValue, list[Leaf]]:
    """Split `state` into its JSON skeleton and its tensors (numpy arrays as tensors)."""
    flattener = _Flattener()
    skeleton = flattener.node(state, "", "")
    return skeleton, flattener.leaves


TensorLookup = Callable[[str], torch.Tensor]


def _unflatten_pairs(body: JsonValue, tensors: TensorLookup) -> Iterator[tuple[Any, Any]]:
    if isinstance(body, dict):
        for key, value in body.items():
            yield key, unflatten(value, tensors)
    elif isinstance(body, list):
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in (str, int)):
                raise CorruptCheckpointError("malformed key/value pair in the skeleton")
            yield pair[0], unflatten(pair[1], tensors)
    else:
        raise CorruptCheckpointError("malformed mapping in the skeleton")


def unflatten(node: JsonValue, tensors: TensorLookup) -> Any:
    """Rebuild the state from its skeleton; `tensors(name)` supplies each tensor."""
    if node is None or type(node) in (bool, str, int, float):
        return node
    if type(node) is list:
        return [unflatten(item, tensors) for item in node]
    if type(node) is not dict or len(node) not in (1, 2):
        raise CorruptCheckpointError(f"malformed skeleton node {str(node)[:80]!r}")
    tag = next(iter(node))
    if tag == "float":
        return _decode_float(node["float"])
    if tag == "tensor":
        return tensors(node["tensor"])
    if tag == "parameter":
        return torch.nn.Parameter(tensors(node["parameter"]), bool(node.get("requires_grad")))
    if tag == "ndarray":
        return tensors(node["ndarray"]).numpy()
    if tag == "tuple" and type(node["tuple"]) is list:
        return tuple(unflatten(item, tensors) for item in node["tuple"])
    if tag == "dict":
        return dict(_unflatten_pairs(node["dict"], tensors))
    if tag == "counter":
        return Counter(dict(_unflatten_pairs(node["counter"], tensors)))
    if tag == "odict":
        result: OrderedDict[Any, Any] = OrderedDict(_unflatten_pairs(node["odict"], tensors))
        if "metadata" in node:
            result._metadata = unflatten(node["metadata"], tensors)  # type: ignore[attr-defined]
        return result
    raise CorruptCheckpointError(f"unknown skeleton tag {tag!r}")


def _children(node: JsonValue) -> Iterator[tuple[str | int | None, JsonValue]]:
    """(key, child node) of a container node; key None for parts that are not keyed."""
    if type(node) is list:
        yield from enumerate(node)
        return
    if type(node) is not dict:
        return
    if "tuple" in node:
        yield from enumerate(node["tuple"])
    for tag in ("dict", "odict", "counter"):
        body = node.get(tag)
        if isinstance(body, dict):
            yield from body.items()
        elif isinstance(body, list):
            yield from ((pair[0], pair[1]) for pair in body)
    if "metadata" in node:
        yield None, node["metadata"]


def tensor_names(node: JsonValue) -> Iterator[str]:
    """Every tensor name the skeleton refers to, in order."""
    if type(node) is dict:
        for tag in ("tensor", "parameter", "ndarray"):
            if tag in node:
                yield node[tag]
                return
    for _, child in _children(node):
        yield from tensor_names(child)


_MISSING = object()


def select(node: JsonValue, prefixes: list[str]) -> JsonValue:
    """The part of the skeleton under the given key prefixes (tensor-name syntax).

    `"model"` selects everything under the top-level key "model"; `"model/fc.weight"`
    one entry. Mappings are pruned to what is selected; a list or tuple on the way to a
    selection is kept whole, since dropping items would shift its indices. Raises
    KeyError naming a prefix that matches nothing.
    """
    found: set[str] = set()
    pruned = _select(node, "", prefixes, found)
    missing = [p for p in prefixes if p not in found]
    if missing or pruned is _MISSING:
        raise KeyError(f"no key {(missing or prefixes)[0]!r} in the checkpoint")
    return pruned


def _select(node: JsonValue, name: str, prefixes: list[str], found: set[str]) -> JsonValue:
    if name and any(name == p or name.startswith(f"{p}/") for p in prefixes):
        found.update(p for p in prefixes if p == name)
        return node
    if name and not any(p.startswith(f"{name}/") for p in prefixes):
        return _MISSING
    if type(node) is not dict or not any(t in node for t in ("dict", "odict", "counter")):
        if type(node) is list or (type(node) is dict and "tuple" in node):
            for child_name in _descendant_names(node, name):
                found.update(p for p in prefixes if p == child_name)
            return node
        return _MISSING
    out: dict[str, JsonValue] = {}
    for tag in ("dict", "odict", "counter"):
        if tag in node:
            pairs = _body_pairs(node[tag])
            kept = [(k, _select(v, _join(name, k), prefixes, found)) for k, v in pairs]
            kept = [(k, v) for k, v in kept if v is not _MISSING]
            if not kept:
                return _MISSING
            as_object = isinstance(node[tag], dict)
            out[tag] = dict(kept) if as_object else [[k, v] for k, v in kept]
    return out


def _body_pairs(body: JsonValue) -> list[tuple[Any, JsonValue]]:
    if isinstance(body, dict):
        return list(body.items())
    return [(pair[0], pair[1]) for pair in body]


def _descendant_names(node: JsonValue, name: str) -> Iterator[str]:
    for key, child in _children(node):
        if key is not None:
            child_name = _join(name, key)
            yield child_name
            yield from _descendant_names(child, child_name)
