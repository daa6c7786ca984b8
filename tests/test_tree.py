"""flatten / unflatten: the JSON skeleton, tensor names, and what is refused (no disk)."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, OrderedDict, defaultdict, namedtuple
from typing import Any

import numpy as np
import pytest
import torch

from ckptstore._tree import flatten, select, tensor_names, unflatten
from ckptstore.errors import UnsupportedValueError


def _no_constants(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name} in the skeleton")


def roundtrip(state: Any) -> Any:
    """flatten, through strict JSON text, and back; tensors handed back by name."""
    skeleton, leaves = flatten(state)
    text = json.dumps(skeleton, allow_nan=False)
    by_name = {leaf.name: leaf.tensor for leaf in leaves}
    return unflatten(json.loads(text, parse_constant=_no_constants), by_name.__getitem__)


def test_plain_values_keep_their_types_and_key_types() -> None:
    state = {
        0: "int key",
        "0": "str key",
        "t": (1, 2.5, None, True, False, "x", -0.0),
        "l": [[], {}, (), [()]],
        "nested": {1: {2: (3,)}},
    }
    back = roundtrip(state)
    assert back == state
    assert list(back) == [0, "0", "t", "l", "nested"]  # order kept
    assert type(back["t"]) is tuple and type(back["l"][2]) is tuple
    assert type(back["nested"][1][2]) is tuple
    assert type(back["t"][1]) is float and type(back["t"][0]) is int
    assert type(back["t"][3]) is bool
    assert math.copysign(1.0, back["t"][6]) == -1.0  # -0.0 stays negative


def test_non_finite_floats_survive_strict_json() -> None:
    back = roundtrip({"a": [math.nan, math.inf, -math.inf]})
    assert math.isnan(back["a"][0])
    assert back["a"][1] == math.inf and back["a"][2] == -math.inf


def test_ordered_dict_keeps_metadata_and_counter_stays_counter() -> None:
    od: OrderedDict[str, Any] = OrderedDict([("b", 1), ("a", 2)])
    metadata = OrderedDict([("", {"version": 1}), ("fc", {"version": 2})])
    od._metadata = metadata  # type: ignore[attr-defined]
    state = {"od": od, "c": Counter({30: 1, 80: 2})}
    back = roundtrip(state)
    assert type(back["od"]) is OrderedDict and list(back["od"]) == ["b", "a"]
    assert back["od"]._metadata == od._metadata  # type: ignore[attr-defined]
    assert type(back["c"]) is Counter and back["c"] == Counter({30: 1, 80: 2})
    assert all(type(k) is int for k in back["c"])


def test_tensor_names_never_collide() -> None:
    a, b, c, d = (torch.tensor(float(i)) for i in range(4))
    state = {"a/b": a, "a": {"b": b}, 0: c, "0": d, "#0": torch.tensor(5.0), "~1": torch.tensor(6)}
    _, leaves = flatten(state)
    names = [leaf.name for leaf in leaves]
    assert len(set(names)) == len(names) == 6
    back = roundtrip(state)
    for got, want in ((back["a/b"], a), (back["a"]["b"], b), (back[0], c), (back["0"], d)):
        assert got.item() == want.item()  # each key gets its own tensor back


def test_parameter_and_requires_grad_come_back() -> None:
    p = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    back = roundtrip({"p": p, "q": torch.nn.Parameter(torch.zeros(1))})
    assert type(back["p"]) is torch.nn.Parameter and not back["p"].requires_grad
    assert back["q"].requires_grad


def test_a_state_that_is_a_bare_tensor_or_list() -> None:
    t = torch.arange(3)
    assert torch.equal(roundtrip(t), t)
    back = roundtrip([t, {"x": t + 1}])
    assert torch.equal(back[0], t) and torch.equal(back[1]["x"], t + 1)


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantization is deprecated; still refused
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


Point = namedtuple("Point", "x y")


class _Thing:
    pass


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {"b": [1, lambda: 0]}}, "['a']['b'][1]"),
        ({"opt": _Thing()}, "['opt']"),
        ({"p": Point(1, 2)}, "['p']"),
        ({"d": defaultdict(int)}, "['d']"),
        ({"n": [np.float32(1.0)]}, "['n'][0]"),
        ({"s": {1, 2}}, "['s']"),
        ({"b": b"bytes"}, "['b']"),
        ({"o": np.array([object()], dtype=object)}, "['o']"),
        ({"k": {(1, 2): 3}}, "['k'][(1, 2)]"),
        ({"k": {1.5: 3}}, "['k'][1.5]"),
        ({"t": torch.ones(2).as_subclass(_Sub)}, "['t']"),
        ({"sp": torch.eye(2).to_sparse()}, "['sp']"),
        ({"q": _quantized()}, "['q']"),
    ],
)
def test_unsupported_values_are_refused_naming_their_key_path(state: Any, path: str) -> None:
    with pytest.raises(UnsupportedValueError) as caught:
        flatten(state)
    assert caught.value.key_path == path
    assert path in str(caught.value)
    assert isinstance(caught.value, TypeError)


def test_a_cycle_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnsupportedValueError, match="cycle"):
        flatten({"x": loop})


def test_the_same_container_twice_is_not_a_cycle() -> None:
    shared = {"a": 1}
    assert roundtrip([shared, shared]) == [{"a": 1}, {"a": 1}]


def test_select_prunes_to_the_requested_keys() -> None:
    t1, t2, t3 = torch.ones(1), torch.ones(2), torch.ones(3)
    state = {"model": {"fc.weight": t1, "fc.bias": t2}, "opt": {0: t3}, "step": 4}
    skeleton, _ = flatten(state)
    picked = select(skeleton, ["model/fc.bias"])
    assert list(tensor_names(picked)) == ["model/fc.bias"]
    assert list(tensor_names(select(skeleton, ["opt"]))) == ["opt/#0"]
    with pytest.raises(KeyError, match="nope"):
        select(skeleton, ["nope"])
