"""A pre-LN transformer encoder with a gradient-checkpointing policy, and tools to measure it.

Gradient checkpointing trades compute for memory: instead of keeping every activation that
backward needs, a checkpointed block keeps only its input and runs its forward a second time
during backward. Three policies are offered:

* ``"none"``: plain autograd; every layer keeps all of its activations.
* ``"every"``: each layer is its own checkpoint; forward keeps one layer input per layer.
* ``"segments"``: about ``sqrt(L)`` segments of consecutive layers, each one checkpoint;
  forward keeps one input per segment, and backward recomputes one segment at a time.

All policies use ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. The
non-reentrant form stashes the CPU (and active device) RNG state before the forward of a
block and restores it for the recomputation (``preserve_rng_state=True`` is its default), so
dropout draws the same masks both times; the tests check that outputs and gradients are
bitwise equal to the unchecked model's, and that they stop being so without the RNG stash.

The measurement helpers count, rather than claim:

* :func:`measure_activation_memory` counts the bytes autograd saves for backward during one
  forward, through ``torch.autograd.graph.saved_tensors_hooks``, each storage once;
  :func:`measure_recompute_memory` counts the transient of recomputing the largest
  checkpointed block in backward, which the forward count cannot see.
* :func:`count_flops` counts matmul/attention FLOPs of forward + backward with
  ``torch.utils.flop_counter.FlopCounterMode``; with checkpointing, the recomputation runs
  inside backward and is therefore counted.
* :func:`activation_memory_table` puts both, and wall time, side by side per depth.

See ``docs/gradient-checkpointing.md`` for measured numbers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CheckpointCost",
    "CheckpointPolicy",
    "EncoderLayer",
    "MemoryEfficientModel",
    "TransformerForecaster",
    "activation_memory_table",
    "count_flops",
    "measure_activation_memory",
    "measure_recompute_memory",
    "segment_bounds",
    "time_forward_backward",
]

CheckpointPolicy = Literal["none", "every", "segments"]
_POLICIES: tuple[str, ...] = get_args(CheckpointPolicy)


def segment_bounds(n_layers: int, policy: CheckpointPolicy) -> list[tuple[int, int]]:
    """Return the ``[start, stop)`` layer ranges that are checkpointed as one block each.

    ``"none"`` gives no ranges. ``"every"`` gives one range per layer. ``"segments"`` gives
    ``round(sqrt(n_layers))`` ranges of near-equal length (the longer ones first), which
    minimises ``kept inputs + largest recomputed segment`` up to rounding.
    """
    if policy not in _POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; expected one of {_POLICIES}")
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    if policy == "none" or n_layers == 0:
        return []
    if policy == "every":
        return [(i, i + 1) for i in range(n_layers)]

    n_segments = max(1, round(math.sqrt(n_layers)))
    base, longer = divmod(n_layers, n_segments)
    bounds, start = [], 0
    for i in range(n_segments):
        stop = start + base + (1 if i < longer else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class EncoderLayer(nn.Module):
    """One pre-LN encoder layer: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Attention goes through ``F.scaled_dot_product_attention``. Dropout is applied inside
    attention (on the attention weights), and on both residual branches.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.fc_in = nn.Linear(d_model, d_ff)
        self.fc_out = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, seq, head_dim)
        # nn.Dropout follows self.training; the functional form needs it spelled out.
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, seq, d_model)`` to the same shape."""
        x = x + self.drop(self._attention(self.norm_attn(x)))
        return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.norm_mlp(x)))))


class MemoryEfficientModel(nn.Module):
    """A pre-LN transformer encoder stack with a gradient-checkpointing policy.

    Input projection (``d_in -> d_model``) plus learned positions, ``n_layers`` of
    :class:`EncoderLayer`, then a final LayerNorm. Maps ``(batch, seq, d_in)`` to
    ``(batch, seq, d_model)``.

    ``checkpoint`` may be changed after construction (it holds no weights), so one set of
    weights can be run under every policy. Checkpointing only applies while autograd is
    recording; under ``torch.no_grad()`` there is nothing to save, so layers run plainly.
    """

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.1,
        checkpoint: CheckpointPolicy = "none",
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.checkpoint = checkpoint

    @property
    def checkpoint(self) -> CheckpointPolicy:
        """The gradient-checkpointing policy: ``"none"``, ``"every"`` or ``"segments"``."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, policy: CheckpointPolicy) -> None:
        # Validate now, not at the first forward, so a typo fails where it is written.
        self._bounds = segment_bounds(len(self.layers), policy)
        self._checkpoint = policy

    def _run_layers(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for layer in self.layers[start:stop]:
            h = layer(h)
        return h

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's input: projected ``x`` plus positions, after dropout."""
        seq = x.shape[1]
        if seq > self.pos.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds max_len {self.pos.shape[0]}")
        return self.drop(self.input_proj(x) + self.pos[:seq])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``(batch, seq, d_in)`` into ``(batch, seq, d_model)``."""
        h = self.embed(x)

        if not self._bounds or not torch.is_grad_enabled():
            return self.norm(self._run_layers(h, 0, len(self.layers)))
        for start, stop in self._bounds:
            # Looked up at call time (not imported by name) so tests can wrap it.
            h = cast(
                torch.Tensor,
                torch.utils.checkpoint.checkpoint(
                    self._run_layers, h, start, stop, use_reentrant=False
                ),
            )
        return self.norm(h)


class TransformerForecaster(nn.Module):
    """One scalar per sequence from a window of features, e.g. next-day realized volatility.

    :class:`MemoryEfficientModel` encodes ``(batch, window, features)``; the encoded window
    is mean-pooled over time and a linear head gives ``(batch,)``. Constructor arguments are
    those of :class:`MemoryEfficientModel`.
    """

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.1,
        checkpoint: CheckpointPolicy = "none",
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.encoder = MemoryEfficientModel(
            d_in, d_model, n_heads, n_layers, d_ff, dropout, checkpoint, max_len
        )
        self.head = nn.Linear(d_model, 1)

    @property
    def checkpoint(self) -> CheckpointPolicy:
        """The encoder's gradient-checkpointing policy."""
        return self.encoder.checkpoint

    @checkpoint.setter
    def checkpoint(self, policy: CheckpointPolicy) -> None:
        self.encoder.checkpoint = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, window, d_in)`` to ``(batch,)``."""
        return self.head(self.encoder(x).mean(dim=1)).squeeze(-1)


def _parameter_storages(model: nn.Module) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _saved_bytes(model: nn.Module, inputs: torch.Tensor, skip: set[int]) -> int:
    held: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Keeping the storage referenced until we return stops its address from being
        # reused by a later allocation, which would make two buffers look like one.
        if ptr not in skip and storage.nbytes() > 0:
            held.setdefault(ptr, storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs)
    del out
    return sum(s.nbytes() for s in held.values())


def measure_activation_memory(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes that autograd holds for backward after one forward of ``model`` on ``inputs``.

    Every tensor saved for backward during the forward goes through a
    ``saved_tensors_hooks`` pack hook; each underlying storage is counted once (keyed by its
    ``data_ptr``), because views such as the q/k/v split share one buffer. Storages of
    parameters and buffers are left out: they live whether or not anything is saved.

    With checkpointing, only the block inputs (saved by the checkpoint itself) reach this
    hook; the recomputation happens later, in backward, and its short-lived activations
    (one block at a time) are not counted here: see :func:`measure_recompute_memory`. The
    forward runs in the model's current mode (train/eval) and its graph is dropped.
    """
    return _saved_bytes(model, inputs, _parameter_storages(model))


def measure_recompute_memory(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes the recomputation of the largest checkpointed block saves, during backward.

    Backward recomputes one block at a time and frees its activations before the next, so
    this is the transient that sits on top of :func:`measure_activation_memory` (gradient
    buffers aside). It is measured by running that block plainly under the same hook on a
    real layer input; the block's input itself is left out, being already counted as kept
    by the checkpoint. Zero for policy ``"none"``. ``model`` must be, or contain, a
    :class:`MemoryEfficientModel`. The global RNG state is left as it was.
    """
    encoder = next((m for m in model.modules() if isinstance(m, MemoryEfficientModel)), None)
    if encoder is None:
        raise TypeError(f"{type(model).__name__} contains no MemoryEfficientModel")
    bounds = segment_bounds(len(encoder.layers), encoder.checkpoint)
    if not bounds:
        return 0

    start, stop = max(bounds, key=lambda b: b[1] - b[0])
    block = nn.Sequential(*encoder.layers[start:stop])
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            hidden = encoder.embed(inputs)
        hidden.requires_grad_(True)  # as checkpoint's detached input is during recompute
        skip = _parameter_storages(block) | {hidden.untyped_storage().data_ptr()}
        return _saved_bytes(block, hidden, skip)


def _sdpa_cpu_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], passes: int) -> int:
    b, h, s_q, d = q
    s_k, d_v = k[2], v[3]
    # One (s_q x d) @ (d x s_k)-sized matmul is 2*b*h*s_q*s_k*d FLOPs; d_v == d here.
    return passes * 2 * b * h * s_q * s_k * max(d, d_v)


def _sdpa_cpu_forward(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    return _sdpa_cpu_flops(q, k, v, passes=2)  # scores, then weights @ v


def _sdpa_cpu_backward(grad: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    # The fused CPU kernel recomputes the scores (1) then forms dV, dP, dQ, dK (4).
    return _sdpa_cpu_flops(q, k, v, passes=5)


# FlopCounterMode (torch 2.13) has no formula for the fused CPU attention kernel that SDPA
# picks when dropout is off, so attention would silently count as zero there. With dropout
# on, SDPA takes the math path (plain bmm) which is counted without help.
_CPU_ATTENTION_FLOPS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def _forward_backward(model: nn.Module, inputs: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(inputs).float().sum().backward()


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """Matmul and attention FLOPs of one forward + backward (loss = sum of the outputs).

    Counted by ``FlopCounterMode``, so the checkpoint recomputation, which runs inside
    backward, is included. Elementwise work (norms, GELU, dropout) is not counted; it is a
    few percent of a transformer's arithmetic but a larger share of its CPU time.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        _forward_backward(model, inputs)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def time_forward_backward(model: nn.Module, inputs: torch.Tensor, repeats: int = 3) -> float:
    """Median wall seconds of one forward + backward, after one untimed warm-up run."""
    _forward_backward(model, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _forward_backward(model, inputs)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


@dataclass(frozen=True)
class CheckpointCost:
    """Measured cost of one checkpoint policy at one depth.

    ``saved_bytes`` is kept from forward to backward; ``recompute_bytes`` is the transient
    of recomputing the largest checkpointed block during backward, on top of it.
    ``saved_ratio`` and ``extra_compute`` are relative to policy ``"none"`` at the same
    depth: saved bytes divided by none's, and FLOPs divided by none's minus one.
    """

    n_layers: int
    policy: CheckpointPolicy
    saved_bytes: int
    recompute_bytes: int
    flops: int
    seconds: float
    saved_ratio: float
    extra_compute: float


def _measure_depth(
    model: TransformerForecaster,
    inputs: torch.Tensor,
    policies: Sequence[CheckpointPolicy],
    repeats: int,
) -> list[CheckpointCost]:
    """Rows for one depth: each policy on the same weights and input, relative to "none"."""
    measured = {}
    for policy in policies:
        model.checkpoint = policy
        measured[policy] = (
            measure_activation_memory(model, inputs),
            measure_recompute_memory(model, inputs),
            count_flops(model, inputs),
            time_forward_backward(model, inputs, repeats),
        )

    base_bytes, _, base_flops, _ = measured["none"]
    rows = []
    for policy in policies:
        saved, recompute, flops, seconds = measured[policy]
        rows.append(
            CheckpointCost(
                n_layers=len(model.encoder.layers),
                policy=policy,
                saved_bytes=saved,
                recompute_bytes=recompute,
                flops=flops,
                seconds=seconds,
                saved_ratio=saved / base_bytes,
                extra_compute=flops / base_flops - 1.0,
            )
        )
    return rows


def activation_memory_table(
    layers: Sequence[int] = (4, 8, 16, 24, 32, 48),
    policies: Sequence[CheckpointPolicy] = ("none", "every", "segments"),
    *,
    d_in: int = 2,
    d_model: int = 128,
    n_heads: int = 4,
    d_ff: int = 512,
    dropout: float = 0.1,
    batch: int = 16,
    window: int = 64,
    repeats: int = 3,
    seed: int = 0,
) -> list[CheckpointCost]:
    """Measure saved bytes, FLOPs and time of a :class:`TransformerForecaster` per depth.

    One model is built per depth (in train mode, so dropout is active) and run under each
    policy with the same weights and input. ``policies`` must include ``"none"``, the
    baseline for the ratios. Rows come depth by depth, in the order of ``policies``.
    """
    if "none" not in policies:
        raise ValueError("policies must include 'none', the baseline for the ratios")
    rows: list[CheckpointCost] = []
    for n_layers in layers:
        torch.manual_seed(seed)
        model = TransformerForecaster(d_in, d_model, n_heads, n_layers, d_ff, dropout)
        inputs = torch.randn(batch, window, d_in)
        rows.extend(_measure_depth(model, inputs, policies, repeats))
    return rows
