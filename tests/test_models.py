"""Gradient checkpointing: same numbers as plain autograd, and the measured memory/compute trade.

Sizes are tiny so the whole module runs in a few seconds on two CPU cores; the shapes being
checked (linear in L, sqrt(L), one extra forward) do not depend on size.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ckptstore.models import (
    CheckpointPolicy,
    MemoryEfficientModel,
    TransformerForecaster,
    activation_memory_table,
    count_flops,
    measure_activation_memory,
    measure_recompute_memory,
    segment_bounds,
)

D_IN, D_MODEL, N_HEADS, D_FF = 3, 16, 2, 32
BATCH, SEQ = 2, 8
# One layer input, float32: what "every" must keep per layer.
LAYER_INPUT_BYTES = BATCH * SEQ * D_MODEL * 4
POLICIES: tuple[CheckpointPolicy, ...] = ("none", "every", "segments")


def _model(
    n_layers: int, policy: CheckpointPolicy = "none", dropout: float = 0.1
) -> TransformerForecaster:
    torch.manual_seed(0)
    return TransformerForecaster(D_IN, D_MODEL, N_HEADS, n_layers, D_FF, dropout, policy)


def _inputs() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, D_IN, generator=torch.Generator().manual_seed(1))


def _step(
    model: torch.nn.Module, x: torch.Tensor, seed: int = 7
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One seeded training step: the output and every parameter gradient."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _saved(n_layers: int, policy: CheckpointPolicy) -> int:
    return measure_activation_memory(_model(n_layers, policy), _inputs())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n_layers", [1, 3, 5, 8])
@pytest.mark.parametrize("dropout", [0.1, 0.0])  # 0.0 takes the fused CPU attention kernel
def test_checkpointing_is_bitwise_equal(
    policy: CheckpointPolicy, n_layers: int, dropout: float
) -> None:
    model, x = _model(n_layers, dropout=dropout), _inputs()
    out_plain, grads_plain = _step(model, x)

    model.checkpoint = policy
    out, grads = _step(model, x)

    assert torch.equal(out, out_plain)
    assert grads.keys() == grads_plain.keys()
    assert len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert torch.equal(grad, grads_plain[name]), name


def test_dropout_is_active_in_the_equality_test() -> None:
    # Without this, the bitwise test could pass merely because dropout never fired.
    model, x = _model(3), _inputs()
    assert not torch.equal(_step(model, x, seed=7)[0], _step(model, x, seed=8)[0])


def test_equality_depends_on_checkpoint_preserving_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model(3), _inputs()
    out_plain, grads_plain = _step(model, x)

    no_stash = functools.partial(torch.utils.checkpoint.checkpoint, preserve_rng_state=False)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", no_stash)
    model.checkpoint = "every"
    out, grads = _step(model, x)

    # Forward is not recomputed, so the output still matches; backward then recomputes
    # with fresh dropout masks and the gradients no longer belong to that output.
    assert torch.equal(out, out_plain)
    assert not all(torch.equal(grads[n], grads_plain[n]) for n in grads_plain)


def test_no_grad_forward_skips_checkpoint_and_matches() -> None:
    model, x = _model(4, "segments"), _inputs()
    model.eval()
    with torch.no_grad():
        checked = model(x)
    model.checkpoint = "none"
    with torch.no_grad():
        assert torch.equal(model(x), checked)


def _fit_line(xs: list[int], ys: list[int]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and largest absolute residual, in float64."""
    a = torch.tensor([[float(x), 1.0] for x in xs], dtype=torch.float64)
    b = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    slope, intercept = torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()
    residual = (a @ torch.tensor([[slope], [intercept]], dtype=torch.float64) - b).abs().max()
    return slope, intercept, float(residual)


def test_every_keeps_one_layer_input_per_layer() -> None:
    depths = [1, 2, 3, 4, 6, 8]
    slope, intercept, residual = _fit_line(depths, [_saved(n, "every") for n in depths])

    assert residual < 0.01 * LAYER_INPUT_BYTES
    assert slope == pytest.approx(LAYER_INPUT_BYTES, rel=0.01)
    # The layer-independent part: input projection, final norm, head, dropout mask.
    assert 0 < intercept < 4 * LAYER_INPUT_BYTES


def test_none_grows_linearly_with_a_much_larger_slope() -> None:
    depths = [1, 2, 4, 6, 8]
    slope, _, residual = _fit_line(depths, [_saved(n, "none") for n in depths])

    assert residual < 0.01 * slope
    # Per layer: norms, q/k/v, attention weights and masks, MLP hidden, GELU input...
    assert slope > 10 * LAYER_INPUT_BYTES


def test_segments_grow_like_sqrt_of_depth() -> None:
    fixed = _saved(0, "segments")  # parts outside the layer stack
    small, large = _saved(16, "segments"), _saved(64, "segments")

    # 4 segments at L=16, 8 at L=64: one kept input each, so the layer part doubles.
    assert small - fixed == 4 * LAYER_INPUT_BYTES
    assert large - fixed == 8 * LAYER_INPUT_BYTES
    # Raw totals grow by less than 2 (the fixed part), far from the 4x of linear growth.
    assert 1.5 < large / small <= 2.0


@pytest.mark.parametrize(
    ("n_layers", "policy", "block"), [(4, "every", 1), (5, "segments", 3), (16, "segments", 4)]
)
def test_recompute_holds_the_largest_block_of_plain_layers(
    n_layers: int, policy: CheckpointPolicy, block: int
) -> None:
    per_layer_plain = _saved(2, "none") - _saved(1, "none")
    recompute = measure_recompute_memory(_model(n_layers, policy), _inputs())
    # The block's own input is already kept by the checkpoint, so it is not counted twice.
    assert recompute == block * per_layer_plain - LAYER_INPUT_BYTES
    assert measure_recompute_memory(_model(n_layers, "none"), _inputs()) == 0


def test_segment_bounds_cover_layers_in_about_sqrt_blocks() -> None:
    for n_layers in range(1, 50):
        bounds = segment_bounds(n_layers, "segments")
        assert bounds[0][0] == 0 and bounds[-1][1] == n_layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        assert len(bounds) == round(math.sqrt(n_layers))
        lengths = [stop - start for start, stop in bounds]
        assert max(lengths) - min(lengths) <= 1
    assert segment_bounds(3, "every") == [(0, 1), (1, 2), (2, 3)]
    assert segment_bounds(3, "none") == []


def test_unknown_policy_is_rejected_at_assignment() -> None:
    model = _model(2)
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        model.checkpoint = "sometimes"  # type: ignore[assignment]


def test_too_long_sequence_is_rejected() -> None:
    model = MemoryEfficientModel(D_IN, D_MODEL, N_HEADS, 1, D_FF, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(_inputs())


def _forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("policy", ["every", "segments"])
def test_checkpointing_costs_exactly_one_extra_forward_of_the_layers(
    policy: CheckpointPolicy,
) -> None:
    model, x = _model(6), _inputs()
    plain = count_flops(model, x)
    layer_forward = (
        _forward_flops(model, x)
        - 2 * BATCH * SEQ * D_IN * D_MODEL  # input projection, not recomputed
        - 2 * BATCH * D_MODEL  # head, not recomputed
    )

    model.checkpoint = policy
    checked = count_flops(model, x)

    assert checked - plain == layer_forward
    # Forward + backward is ~3 forwards, so one more is ~+33%.
    assert 1.25 < checked / plain < 1.4


def test_attention_flops_are_counted_on_the_fused_cpu_path() -> None:
    # dropout=0 makes SDPA take the fused CPU kernel, which FlopCounterMode alone counts as
    # zero; with our formulas its backward counts one extra (recomputed scores) matmul per
    # layer compared with the unfused path that dropout forces.
    x, n_layers = _inputs(), 3
    fused, unfused = count_flops(_model(n_layers, dropout=0.0), x), count_flops(_model(n_layers), x)
    assert fused - unfused == n_layers * 2 * BATCH * SEQ * SEQ * D_MODEL


def test_activation_memory_table_rows() -> None:
    rows = activation_memory_table(
        layers=(2, 4), d_model=16, n_heads=2, d_ff=32, batch=2, window=8, repeats=1
    )
    assert [(r.n_layers, r.policy) for r in rows] == [(n, p) for n in (2, 4) for p in POLICIES]
    for row in rows:
        assert row.saved_bytes > 0 and row.flops > 0 and row.seconds > 0
        assert (row.recompute_bytes == 0) == (row.policy == "none")
        if row.policy == "none":
            assert row.saved_ratio == 1.0 and row.extra_compute == 0.0
        else:
            assert row.saved_ratio < 0.5
            assert 0.25 < row.extra_compute < 0.4


def test_activation_memory_table_needs_a_baseline() -> None:
    with pytest.raises(ValueError, match="'none'"):
        activation_memory_table(layers=(1,), policies=("every",))
