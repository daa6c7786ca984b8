"""Each numbered case of the storage-core issue, as its own test.

Expected values come from torch itself (clones taken at the call, a second model
trained without a checkpoint), from the safetensors library, from xxhash applied to
the documented canonical form, or are worked out by hand; never from ckptstore.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from faults import FaultyStorage, route_saves_through
from safetensors import safe_open
from safetensors.torch import load_file

import ckptstore
from ckptstore._read import CheckpointReader
from ckptstore._storage import LocalStorage

SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> bytes:
    """The values' bytes in logical order (`reshape(-1).view(uint8)`, via numpy)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.element_size() in SAME_SIZE_INT:
        t = t.view(SAME_SIZE_INT[t.element_size()])
    return t.reshape(-1).numpy().tobytes()


def strict_json(data: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def header_of(payload: Path) -> dict[str, Any]:
    data = payload.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])


# --- 1. any training state ------------------------------------------------------------


def _adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()


def test_model_optimizer_and_scheduler_accept_loaded_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    x = torch.randn(16, 4)
    for _ in range(3):
        _adamw_step(model, opt, x)
        sched.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    ckptstore.save(tmp_path / "ck", state, step=3)

    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1)
    twin_sched = torch.optim.lr_scheduler.MultiStepLR(twin_opt, milestones=[9], gamma=0.9)
    loaded = ckptstore.load(tmp_path / "ck")
    twin.load_state_dict(loaded["model"])
    twin_opt.load_state_dict(loaded["opt"])
    twin_sched.load_state_dict(loaded["sched"])

    for _ in range(3):  # both continue; the restored one must follow bit for bit
        for m, o, s in ((model, opt, sched), (twin, twin_opt, twin_sched)):
            _adamw_step(m, o, x)
            s.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert bits(a) == bits(b), name
    assert sched.get_last_lr() == twin_sched.get_last_lr()


def test_multisteplr_milestones_stay_a_counter_of_ints_and_lr_decays(tmp_path: Path) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    ckptstore.save(tmp_path / "ck", sched.state_dict())
    loaded = ckptstore.load(tmp_path / "ck")
    assert type(loaded["milestones"]) is Counter
    assert loaded["milestones"] == Counter({2: 1, 4: 1})  # int keys, not "2" and "4"

    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = torch.optim.lr_scheduler.MultiStepLR(fresh_opt, milestones=[100])
    fresh.load_state_dict(loaded)
    lrs = []
    for _ in range(5):
        fresh_opt.step()
        fresh.step()
        lrs.append(fresh_opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])  # worked by hand


class _Versioned(torch.nn.Module):
    _version = 7

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.seen: list[Any] = []

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict: Any, prefix: str, local_metadata: Any, *a: Any
    ):
        self.seen.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *a)


def test_ordered_dict_metadata_reaches_module_load_state_dict(tmp_path: Path) -> None:
    sd = _Versioned().state_dict()
    ckptstore.save(tmp_path / "ck", {"model": sd})
    loaded = ckptstore.load(tmp_path / "ck")["model"]
    assert type(loaded) is OrderedDict
    assert loaded._metadata == sd._metadata  # type: ignore[attr-defined]
    target = _Versioned()
    target.load_state_dict(loaded)
    assert target.seen == [7]  # without _metadata the module would see version None


def test_key_paths_never_collide_in_the_payload(tmp_path: Path) -> None:
    state = {"a/b": torch.tensor(1.0), "a": {"b": torch.tensor(2.0)}, 0: torch.tensor(3.0)}
    state["0"] = torch.tensor(4.0)
    ckptstore.save(tmp_path / "ck", state)
    loaded = ckptstore.load(tmp_path / "ck")
    assert list(loaded) == ["a/b", "a", 0, "0"]
    assert [
        loaded["a/b"].item(),
        loaded["a"]["b"].item(),
        loaded[0].item(),
        loaded["0"].item(),
    ] == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    assert len(load_file(str(tmp_path / "ck" / "payload.safetensors"))) == 4


def test_numpy_arrays_come_back_as_numpy(tmp_path: Path) -> None:
    arrays = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "scalar": np.array(3 + 4j, dtype=np.complex128),
        "empty": np.zeros((0, 2), dtype=np.uint64),
        "big_endian": np.arange(3, dtype=">i4"),
        "reversed_one": np.arange(1, dtype=np.int16)[::-1],
    }
    ckptstore.save(tmp_path / "ck", arrays)
    loaded = ckptstore.load(tmp_path / "ck")
    for key, want in arrays.items():
        got = loaded[key]
        assert type(got) is np.ndarray and got.shape == want.shape, key
        assert got.dtype == want.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"model": {"fc": torch.ones(2)}, "hook": print}, "['hook']"),
        ({"cfg": {"layers": [1, object()]}}, "['cfg']['layers'][1]"),
        ({"opt": {"state": {0: {"k": np.array(["s"], dtype=object)}}}}, "['opt']['state'][0]['k']"),
    ],
)
def test_refused_value_names_its_key_path_and_nothing_is_written(
    tmp_path: Path, state: Any, path: str
) -> None:
    with pytest.raises(ckptstore.UnsupportedValueError) as caught:
        ckptstore.save(tmp_path / "ck", state)
    assert path in str(caught.value)
    assert os.listdir(tmp_path) == []

    with ckptstore.Checkpointer() as saver, pytest.raises(ckptstore.UnsupportedValueError):
        saver.save(tmp_path / "ck", state)
    assert os.listdir(tmp_path) == []


# --- 2. every dtype, bit for bit --------------------------------------------------------


def test_zero_dim_and_zero_size_shapes_come_back_exact(tmp_path: Path) -> None:
    state = {
        "scalar": torch.tensor(3.5),
        "z": torch.zeros(2, 0),
        "zb": torch.zeros(0, 3, dtype=torch.bfloat16),
        "special": torch.tensor([-0.0, float("nan"), 1e-45, float("-inf")]),
    }
    ckptstore.save(tmp_path / "ck", state)
    loaded = ckptstore.load(tmp_path / "ck")
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 3.5
    assert loaded["z"].shape == (2, 0) and loaded["zb"].shape == (0, 3)
    assert loaded["zb"].dtype == torch.bfloat16
    assert bits(loaded["special"]) == bits(state["special"])


def test_non_contiguous_tensors_keep_values_shape_and_dtype(tmp_path: Path) -> None:
    base = torch.randn(6, 4, dtype=torch.float64)
    image = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    state = {"t": base.t(), "step": base[::2], "cl": image}
    ckptstore.save(tmp_path / "ck", state)
    loaded = ckptstore.load(tmp_path / "ck")
    for key, want in state.items():
        assert loaded[key].shape == want.shape and loaded[key].dtype == want.dtype
        assert bits(loaded[key]) == bits(want), key


def test_complex128_is_stored_as_float64_pairs_and_comes_back_complex(tmp_path: Path) -> None:
    z = torch.randn(3, dtype=torch.complex128)
    ckptstore.save(tmp_path / "ck", {"z": z})
    payload = tmp_path / "ck" / "payload.safetensors"
    assert header_of(payload)["z"]["dtype"] == "F64"
    assert torch.equal(load_file(str(payload))["z"], torch.view_as_real(z))
    loaded = ckptstore.load(tmp_path / "ck")["z"]
    assert loaded.dtype == torch.complex128 and bits(loaded) == bits(z)


def test_conjugate_and_negative_views_are_materialised(tmp_path: Path) -> None:
    z = torch.randn(4, dtype=torch.complex64)
    conj, neg = z.conj(), z.conj().imag
    assert conj.is_conj() and neg.is_neg()
    ckptstore.save(tmp_path / "ck", {"z": z, "conj": conj, "neg": neg})
    loaded = ckptstore.load(tmp_path / "ck")
    assert bits(loaded["conj"]) == bits(torch.conj_physical(z))
    assert bits(loaded["neg"]) == bits(-z.imag)
    assert bits(loaded["z"]) == bits(z)
    assert not loaded["conj"].is_conj() and not loaded["neg"].is_neg()


def test_callers_tensors_are_never_modified(tmp_path: Path) -> None:
    e = torch.randn(5, 3)
    z = torch.randn(3, dtype=torch.complex64)
    state = {"e": e, "tied": e, "t": e.t(), "conj": z.conj(), "np": np.ones(3), "b": e[1:3]}
    before = {k: (bits(v), v._version) for k, v in state.items() if isinstance(v, torch.Tensor)}
    with ckptstore.Checkpointer() as saver:
        saver.save(tmp_path / "a", state).wait()
    ckptstore.save(tmp_path / "b", state)
    for key, (data, version) in before.items():
        assert bits(state[key]) == data and state[key]._version == version, key
    assert state["conj"].is_conj()
    np.testing.assert_array_equal(state["np"], np.ones(3))


def test_loads_land_on_cpu_and_map_location_is_honoured(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "ck", {"w": torch.randn(3), "e": torch.randn(2, 2)})
    assert ckptstore.load(tmp_path / "ck")["w"].device.type == "cpu"
    on_meta = ckptstore.load(tmp_path / "ck", map_location="meta")
    assert on_meta["w"].device.type == "meta" and on_meta["e"].shape == (2, 2)
    explicit = ckptstore.load(tmp_path / "ck", map_location=torch.device("cpu"))
    assert explicit["w"].device == torch.device("cpu")


# --- 3. shared storage --------------------------------------------------------------------


def test_tied_weights_are_stored_once_and_come_back_sharing(tmp_path: Path) -> None:
    embed = torch.randn(64, 32)
    ckptstore.save(tmp_path / "ck", {"embed.weight": embed, "lm_head.weight": embed})
    payload = (tmp_path / "ck" / "payload.safetensors").read_bytes()
    assert payload.count(bits(embed)) == 1
    assert len(payload) < 2 * embed.numel() * 4  # not written twice

    loaded = ckptstore.load(tmp_path / "ck")
    a, b = loaded["embed.weight"], loaded["lm_head.weight"]
    assert bits(a) == bits(embed) and bits(b) == bits(embed)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    with torch.no_grad():
        a.add_(1)  # really shared: a write through one is seen through the other
    assert torch.equal(a, b)


def test_a_slice_of_another_tensor_shares_its_storage_after_load(tmp_path: Path) -> None:
    x = torch.randn(100)
    ckptstore.save(tmp_path / "ck", {"a": x, "b": x[:50], "c": x[10:20].view(torch.int32)})
    loaded = ckptstore.load(tmp_path / "ck")
    assert bits(loaded["a"]) == bits(x) and bits(loaded["b"]) == bits(x[:50])
    assert bits(loaded["c"]) == bits(x[10:20].view(torch.int32))
    assert loaded["b"].dtype == torch.float32 and loaded["c"].dtype == torch.int32
    ptr = loaded["a"].untyped_storage().data_ptr()
    assert loaded["b"].untyped_storage().data_ptr() == ptr
    assert loaded["c"].untyped_storage().data_ptr() == ptr
    assert (tmp_path / "ck" / "payload.safetensors").read_bytes().count(bits(x)) == 1


def test_empty_tensors_are_never_taken_for_shared_ones(tmp_path: Path) -> None:
    x = torch.randn(4)
    state = {"e1": torch.empty(0), "e2": torch.empty(0, 3), "x": x, "x0": x[:0], "x1": x[4:]}
    ckptstore.save(tmp_path / "ck", state)
    loaded = ckptstore.load(tmp_path / "ck")
    for key, want in state.items():
        assert loaded[key].shape == want.shape and loaded[key].dtype == want.dtype, key
    assert bits(loaded["x"]) == bits(x)


# --- 4. snapshot before return -------------------------------------------------------------


def test_adamw_checkpoint_holds_the_state_at_the_call(tmp_path: Path, monkeypatch: Any) -> None:
    import threading

    gate = threading.Event()  # the writer may not touch the disk until we let it
    storage = FaultyStorage(tmp_path, gate=gate)
    route_saves_through(monkeypatch, storage)
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.full((4, 4), 0.5)
    opt.step()
    moments = opt.state[w]
    expected = {
        "w": w.detach().clone(),
        "exp_avg": moments["exp_avg"].clone(),
        "exp_avg_sq": moments["exp_avg_sq"].clone(),
        "step": moments["step"].clone(),
    }

    saver = ckptstore.Checkpointer()
    handle = saver.save(tmp_path / "step1", {"w": w, "opt": opt.state_dict()}, step=1)
    for _ in range(5):
        opt.step()
    with torch.no_grad():
        w.add_(1)
    assert not handle.done()
    gate.set()
    saver.close()

    loaded = ckptstore.load(tmp_path / "step1")
    state = loaded["opt"]["state"][0]
    assert bits(loaded["w"]) == bits(expected["w"])
    assert bits(state["exp_avg"]) == bits(expected["exp_avg"])
    assert bits(state["exp_avg_sq"]) == bits(expected["exp_avg_sq"])
    assert state["step"].shape == () and state["step"].item() == 1.0
    assert bits(state["step"]) == bits(expected["step"])


def test_staging_buffers_are_reused_across_saves_of_the_same_shapes(tmp_path: Path) -> None:
    saver = ckptstore.Checkpointer()
    pool = saver._writer.staging
    acquired: list[int] = []
    original = pool.acquire

    def spy(nbytes: int, pinned: bool) -> torch.Tensor:
        buffer = original(nbytes, pinned)
        acquired.append(buffer.data_ptr())
        return buffer

    pool.acquire = spy  # type: ignore[method-assign]
    state = {"w": torch.randn(256, 256)}
    for i in range(3):
        saver.save(tmp_path / f"ck{i}", state).wait()
    saver.close()
    assert len(acquired) == 3 and len(set(acquired)) == 1


# --- 7. manifest ----------------------------------------------------------------------------


def test_manifest_is_strict_json_with_what_design_lists(tmp_path: Path) -> None:
    state = {"x": torch.ones(2), "lr": float("nan"), "best": float("-inf")}
    metrics = {"loss": float("nan"), "acc": float("inf"), "n": 3}
    metadata = {"git_commit": "abc123", "config": {"layers": 4, "eps": float("inf")}}
    ckptstore.save(tmp_path / "ck", state, step=12, metrics=metrics, metadata=metadata)
    body = strict_json((tmp_path / "ck" / "manifest.json").read_bytes())
    assert body["format_version"] == 1 and body["step"] == 12
    assert body["created"].endswith("+00:00")  # UTC
    assert {"ckptstore", "torch", "python"} <= set(body["versions"])
    assert body["metrics"]["loss"] == {"float": "nan"} and body["metrics"]["n"] == 3
    assert "abc123" in json.dumps(body["metadata"])
    record = body["files"]["payload.safetensors"]
    assert record["size"] == (tmp_path / "ck" / "payload.safetensors").stat().st_size
    entry = body["entries"]["x"]
    assert entry["dtype"] == "float32" and entry["shape"] == [2]
    assert entry["checksum"] == xxhash.xxh3_64_hexdigest(bits(torch.ones(2)))

    loaded = ckptstore.load(tmp_path / "ck")
    assert math.isnan(loaded["lr"]) and loaded["best"] == float("-inf")


def test_manifest_checksum_covers_its_canonical_bytes(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "ck", {"x": torch.ones(2)}, step=1)
    body = strict_json((tmp_path / "ck" / "manifest.json").read_bytes())
    claimed = body.pop("checksum")
    canonical = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert claimed == "xxh3-64:" + xxhash.xxh3_64_hexdigest(canonical)

    # A flipped digit (step 1 -> 7) is caught, not parsed.
    text = (tmp_path / "ck" / "manifest.json").read_text()
    (tmp_path / "ck" / "manifest.json").write_text(text.replace('"step": 1', '"step": 7'))
    with pytest.raises(ckptstore.CorruptCheckpointError, match="checksum"):
        ckptstore.load(tmp_path / "ck")


def _rewrite_manifest(path: Path, change: Any) -> None:
    """Edit a manifest and sign it again, the documented way (an honest newer writer)."""
    body = strict_json(path.read_bytes())
    body.pop("checksum")
    change(body)
    canonical = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    body["checksum"] = "xxh3-64:" + xxhash.xxh3_64_hexdigest(canonical)
    path.write_text(json.dumps(body))


def test_a_newer_format_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "ck", {"x": torch.ones(2)})
    _rewrite_manifest(tmp_path / "ck" / "manifest.json", lambda b: b.update(format_version=2))
    with pytest.raises(ckptstore.FormatVersionError, match=r"version 2.*upgrade"):
        ckptstore.load(tmp_path / "ck")
    assert ckptstore.verify(tmp_path / "ck").status == "corrupt"


def test_a_hostile_shape_is_refused_before_allocation(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "ck", {"x": torch.ones(2)})

    def grow(body: dict[str, Any]) -> None:
        body["tensors"]["x"]["shape"] = [1 << 40, 1 << 20]

    _rewrite_manifest(tmp_path / "ck" / "manifest.json", grow)
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(tmp_path / "ck")


# --- 8. load and verify ---------------------------------------------------------------------


def test_loading_selected_keys_reads_only_their_bytes(tmp_path: Path) -> None:
    big, small = torch.randn(512, 512), torch.randn(100, dtype=torch.float64)
    state = {"model": {"big": big, "small": small}, "step": 7}
    ckptstore.save(tmp_path / "ck", state)
    with CheckpointReader(LocalStorage(tmp_path), "ck") as reader:
        part = reader.load(keys=["model/small"])
        assert reader.bytes_read == small.numel() * 8
    assert list(part) == ["model"] and list(part["model"]) == ["small"]
    assert bits(part["model"]["small"]) == bits(small)
    with pytest.raises(KeyError, match="nope"):
        ckptstore.load(tmp_path / "ck", keys=["nope"])


def test_a_flipped_payload_byte_names_checkpoint_file_and_tensor(tmp_path: Path) -> None:
    w = torch.randn(64)
    ckptstore.save(tmp_path / "ck", {"w": w, "v": torch.randn(8)})
    payload = tmp_path / "ck" / "payload.safetensors"
    data = bytearray(payload.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] + header_of(payload)["w"]["data_offsets"][0]
    data[start + 5] ^= 0x01
    payload.write_bytes(bytes(data))

    with pytest.raises(ckptstore.CorruptCheckpointError) as caught:
        ckptstore.load(tmp_path / "ck")
    assert caught.value.key == "w" and caught.value.file == "payload.safetensors"
    assert str(tmp_path / "ck") in str(caught.value)
    assert ckptstore.load(tmp_path / "ck", keys=["v"])["v"].shape == (8,)  # v is intact
    assert ckptstore.verify(tmp_path / "ck").status == "sound"  # quick: sizes and header only
    report = ckptstore.verify(tmp_path / "ck", deep=True)
    assert report.status == "corrupt"
    assert {(p.file, p.key) for p in report.problems} >= {("payload.safetensors", "w")}
    assert all(p.offset is not None for p in report.problems)


def test_verify_reports_a_missing_manifest_as_incomplete(tmp_path: Path) -> None:
    ckptstore.save(tmp_path / "ck", {"w": torch.ones(3)})
    assert ckptstore.verify(tmp_path / "ck", deep=True).status == "sound"
    (tmp_path / "ck" / "manifest.json").unlink()
    assert ckptstore.verify(tmp_path / "ck").status == "incomplete"
    with pytest.raises(ckptstore.IncompleteCheckpointError):
        ckptstore.load(tmp_path / "ck")


def test_plain_payload_opens_with_the_safetensors_library(tmp_path: Path) -> None:
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(7),
        "u8": torch.arange(4, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "nested": {"t": torch.randn(2, 3).t()},
    }
    ckptstore.save(tmp_path / "ck", state)
    path = str(tmp_path / "ck" / "payload.safetensors")
    stored = load_file(path)
    flat = {k: v for k, v in state.items() if k != "nested"}
    for key, want in flat.items():
        assert stored[key].dtype == want.dtype and stored[key].shape == want.shape, key
        assert bits(stored[key]) == bits(want), key
    assert bits(stored["nested/t"]) == bits(state["nested"]["t"])  # stored contiguous
    with safe_open(path, framework="pt") as f:  # one tensor without the rest
        assert bits(f.get_tensor("i64")) == bits(state["i64"])


def test_staging_buffers_survive_sizes_that_shrink_grow_and_shrink(tmp_path: Path) -> None:
    # A smaller state after a larger one reuses a larger free buffer; picking it must not
    # compare buffers elementwise (it did: list.remove raised a size-mismatch error).
    with ckptstore.CheckpointManager(tmp_path / "run") as manager:
        for step, n in enumerate([10, 1000, 10, 1000, 10]):
            manager.save(step, {"x": torch.full((n,), float(step))})
            manager.wait()
        assert torch.equal(manager.load(4)["x"], torch.full((10,), 4.0))


def test_load_follows_a_pointer_and_explains_a_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with ckptstore.CheckpointManager(run) as manager:
        manager.save(1, {"w": torch.ones(2)})
        manager.save(2, {"w": torch.full((2,), 2.0)})
    assert torch.equal(ckptstore.load(run / "latest")["w"], torch.full((2,), 2.0))
    with pytest.raises(ckptstore.CheckpointNotFoundError, match="run directory"):
        ckptstore.load(run)
