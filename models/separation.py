"""SAND's reusable split / align / distance component (docs/model.md).

Any backbone that turns item modal features into a per-modality representation ``z_m`` (rows = items) can attach
:class:`ModalSeparation`: it splits ``z_m`` by columns into a modal-generic part ``G_m`` (first ``split_ratio`` of the
columns) and a modal-unique part ``Q_m`` (the rest), aligns the generic parts across modalities (SoloSim or InfoNCE on
projection heads) and pushes each generic part away from its unique part (CLUB mutual-information bound or negative l2).
SAND uses it on its full-width modal transform; VBPR and FREEDOM on their projected modal features.

Fast path (docs/model.md, departure 11). Every consumer of ``z_m`` here (the first layer of the projection head,
``E1_m``, ``E2_m``) is linear, and so is SAND's GCN input MLP. When ``z_m = X_m W^T + b`` comes from a linear map, a
consumer ``C`` computes ``C(z_m) = X_m (W^T C^T) + (b C^T + c)``: multiplying the small weight matrices first costs
``d_in*d*out + N*d_in*out`` instead of ``N*d_in*d + N*d*out``. A backbone passes such a ``z_m`` unevaluated as a
:class:`LinearView`; plain tensors work too (what the plug-ins pass). Both give the same function, to float rounding.

Departures from the authors' code (docs/model.md, departures 1, 4, 6, 7): one CLUB estimator per modality, fitted on
that modality's (E1_m, E2_m) pairs (by default before the bound that uses them) and never trained by the main loss;
SoloSim and the distancing term may run over the batch's items for large N."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.profiler import record_function
from torch.func import functional_call

from sand.models.club_fit import fit_clubs
from sand.models.losses import L2_FORMS, ClubEstimator, infonce_loss, l2_distance_loss, solosim_loss
from sand.models.precision import low_linear

ALIGNS = ("solosim", "infonce", "none")
DISTANCES = ("club", "l2", "none")
SCOPES = ("auto", "all", "batch")
#: When the CLUB estimators are fitted relative to the bound that uses them (docs/model.md, departure 4).
FIT_ORDERS = ("before", "after")
#: ``solosim_scope="auto"`` computes over all items up to this catalogue size, else over the batch
#: items: SoloSim over all items costs N x N logits per batch (N^2 (d + 1) multiply-adds three times
#: over; the literal form holds 4 N^2 bytes per copy, 2.1 GB at Clothing's 23,033 items).
AUTO_SCOPE_MAX_ITEMS = 20_000
#: ``distance_scope="auto"`` computes over all items up to this catalogue size. The distancing term and the CLUB fit are
#: linear in N: about 1.5 KB per item and modality at their peak (E1, E2 and the estimator's N x 32 intermediates in
#: float32), 70 MB for both modalities at Clothing's 23,033 items, 3 GB at 1,000,000 (docs/model.md, "Scopes").
AUTO_DISTANCE_MAX_ITEMS = 1_000_000

#: Profiler label of the folded reads of the raw features, forward and backward
#: (benchmarks/bench_sand_speed.py reads it).
FOLDED_READS = "sand::folded_reads"
#: Fused Adam (one kernel for all parameters): the CLUB optimisers step 50 times per batch
#: and the per-parameter loop of the default implementation costs more than the step itself.
_FAST_ADAM: dict[str, Any] = {"fused": True}


@dataclass(frozen=True)
class LinearView:
    """``z = x @ weight.T + bias``, kept unevaluated so linear consumers can fold the weights.

    ``x``: (n, d_in) inputs (usually frozen raw features); ``weight``: (d, d_in); ``bias``: (d,) or None. Slicing
    columns of ``z`` slices rows of ``weight``, slicing rows of ``z`` slices rows of ``x``: neither needs ``z`` itself.
    ``fold``: None picks the evaluation order with fewer multiply-adds (see :meth:`folds`); True/False force it.
    ``start``: column offset of this view in the view it was sliced from (keys ``reads``). ``reads``: outputs of
    consumers computed ahead for all rows (:func:`prefetch_reads`), keyed by ``(id(consumer), first column, last column
    + 1)``; dropped by row slicing. ``x_low``: a low-precision (bfloat16) copy of a fixed ``x``; when given, every
    product with ``x`` and the folding of the weights run in its dtype (float32 accumulation, float32 results, see
    :mod:`models.precision`). ``x`` itself then gets no gradient. ``weight_low``: ``weight`` in that dtype (cast on use
    when not given)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    fold: bool | None = None
    start: int = 0
    reads: Mapping[tuple[int, int, int], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    x_low: torch.Tensor | None = field(default=None, compare=False, repr=False)
    weight_low: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.x.shape[0]), int(self.weight.shape[0]))

    def rows(self, index: torch.Tensor) -> LinearView:
        x_low = None if self.x_low is None else self.x_low[index]
        return LinearView(
            self.x[index], self.weight, self.bias, self.fold, self.start, x_low=x_low, weight_low=self.weight_low
        )

    def columns(self, start: int, stop: int) -> LinearView:
        bias = None if self.bias is None else self.bias[start:stop]
        weight_low = None if self.weight_low is None else self.weight_low[start:stop]
        return replace(self, weight=self.weight[start:stop], bias=bias, start=self.start + start, weight_low=weight_low)

    def folds(self, n_out: int) -> bool:
        """Whether consumers with ``n_out`` outputs in all read ``x`` through folded weights.

        Folded: ``d_in*d*n_out + n*d_in*n_out`` multiply-adds; forming ``z`` first: ``n*d_in*d + n*d*n_out``. Folding
        wins when there are more rows than outputs (all items of a catalogue); forming ``z`` wins for a few rows."""
        if self.fold is not None:
            return self.fold
        n, d_in = self.x.shape
        d = self.weight.shape[0]
        return d_in * d * n_out + n * d_in * n_out <= n * d_in * d + n * d * n_out

    def dense(self) -> torch.Tensor:
        if self.x_low is None:
            return F.linear(self.x, self.weight, self.bias)
        return low_linear(self.x_low, self.weight, self.bias, self.weight_low)

    def detach(self) -> LinearView:
        bias = None if self.bias is None else self.bias.detach()
        return replace(self, x=self.x.detach(), weight=self.weight.detach(), bias=bias, reads=None)


ModalInput = torch.Tensor | LinearView


def _rows(z: ModalInput, index: torch.Tensor | None) -> ModalInput:
    if index is None:
        return z
    return z.rows(index) if isinstance(z, LinearView) else z[index]


def _columns(z: ModalInput, start: int, stop: int) -> ModalInput:
    return z.columns(start, stop) if isinstance(z, LinearView) else z[:, start:stop]


def read_through(z: ModalInput, consumers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """``[c(z) for c in consumers]``, computed without forming ``z`` when that is cheaper.

    For a :class:`LinearView` the folded product ``x @ (W^T [C_1^T ... C_k^T])`` is one matrix product, unless
    :meth:`LinearView.folds` says forming ``z`` is cheaper."""
    if not isinstance(z, LinearView):
        return [c(z) for c in consumers]
    stop = z.start + z.weight.shape[0]
    if z.reads is not None and all((id(c), z.start, stop) in z.reads for c in consumers):
        return [z.reads[(id(c), z.start, stop)] for c in consumers]
    outs = [c.out_features for c in consumers]
    if not z.folds(sum(outs)):
        dense = z.dense()
        return [c(dense) for c in consumers]
    return list(_folded_read(z, [(0, z.weight.shape[0], c) for c in consumers]))


class _FoldedReads(torch.autograd.Function):
    """``x @ cat_k(C_k W[s_k:e_k])^T + cat_k(C_k b[s_k:e_k] + c_k)``: all consumers, one read of ``x``.

    Why a Function: through autograd, every consumer of a column slice of ``W`` reads ``x`` once forward and once
    backward (skinny products, slower per multiply-add than one wide product), and each slice's backward fills a zero
    ``W``-sized gradient and adds it. Here forward is one product with ``x`` and backward one ``dH^T x``, with each
    consumer's share of ``dW`` accumulated in place. ``ranges``: ``(s_k, e_k)`` per consumer; ``params``: ``C_1, c_1,
    C_2, c_2, ...`` (a bias may be None)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ranges, *params):
        with record_function(FOLDED_READS):
            return _FoldedReads._forward(ctx, x, weight, bias, ranges, params)

    @staticmethod
    def _forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ranges, params):
        cw, cb = params[0::2], params[1::2]
        # (d_in, sum out), built and used in this layout: ``x @ folded`` with a contiguous
        # right operand ran ~1.5x faster than with the transposed (sum out, d_in) one
        # (MKL, 7,050 x 4,096 x 384), and ``W^T C^T`` is ~15% faster than ``C W`` here.
        folded = torch.cat([weight[s:e].T @ c.T for c, (s, e) in zip(cw, ranges, strict=True)], dim=1)
        ctx.ranges = ranges
        ctx.has_bias = (bias is not None, tuple(b is not None for b in cb))
        ctx.save_for_backward(x, weight, bias, folded if ctx.needs_input_grad[0] else None, *cw)
        return torch.addmm(_folded_bias(bias, ranges, cw, cb), x, folded)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        with record_function(FOLDED_READS):
            return _FoldedReads._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor):
        x, weight, bias, folded, *cw = ctx.saved_tensors
        has_bias, has_cb = ctx.has_bias
        grad_folded = grad.T @ x  # (sum out, d_in): the one backward read of x
        grad_b_all = grad.sum(0)
        want_w, want_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_w, full = None, None
        if want_w:
            # Start from a consumer of all columns (plain product), else from zeros.
            full = next((k for k, r in enumerate(ctx.ranges) if r == (0, weight.shape[0])), None)
            if full is None:
                grad_w = torch.zeros_like(weight)
            else:
                row = sum(c.shape[0] for c in cw[:full])
                grad_w = cw[full].T @ grad_folded[row : row + cw[full].shape[0]]
        grad_bias = torch.zeros_like(bias) if want_b and has_bias else None
        grads_c: list[torch.Tensor | None] = []
        row = 0
        for k, (c, (s, e)) in enumerate(zip(cw, ctx.ranges, strict=True)):
            g_f, g_b = grad_folded[row : row + c.shape[0]], grad_b_all[row : row + c.shape[0]]
            row += c.shape[0]
            g_c = None
            if ctx.needs_input_grad[4 + 2 * k]:
                g_c = (weight[s:e] @ g_f.T).T  # = g_f W^T; this order ran ~1.5x faster
                if has_bias:
                    g_c.addr_(g_b, bias[s:e])
            grads_c += [g_c, g_b if has_cb[k] and ctx.needs_input_grad[5 + 2 * k] else None]
            if grad_w is not None and k != full:
                grad_w[s:e].addmm_(c.T, g_f)
            if grad_bias is not None:
                grad_bias[s:e].addmv_(c.T, g_b)
        grad_x = grad @ folded.T if folded is not None else None  # x is usually frozen features
        return (grad_x, grad_w, grad_bias, None, *grads_c)


def _folded_bias(bias: torch.Tensor | None, ranges, cw, cb) -> torch.Tensor:
    """``cat_k(C_k b[s_k:e_k] + c_k)``: the folded bias of all consumers (float32)."""
    parts = []
    for c, b, (s, e) in zip(cw, cb, ranges, strict=True):
        part = c @ bias[s:e] if bias is not None else c.new_zeros(c.shape[0])
        parts.append(part if b is None else part + b)
    return torch.cat(parts)


class _LowFoldedReads(torch.autograd.Function):
    """:class:`_FoldedReads` with the big products in a low precision (bfloat16).

    ``x_low`` and ``weight_low`` are low-precision copies of the fixed inputs and of ``W`` (made by the caller, so one
    cast of ``W`` serves every read of a batch); ``weight`` is the float32 parameter that receives the gradient. Why
    another layout: the consumers' weights are stacked into one block matrix ``P`` (``d x sum out``, ``C_k^T`` at rows
    ``s_k:e_k``, zeros elsewhere), so folding, ``dW = P dF`` and the consumer gradients ``W dF^T`` are one product each
    (about 20% more multiply-adds than one per consumer, but each low-precision result is converted to float32 once, and
    on a CPU these conversions and fresh allocations cost as much as the products). Products accumulate in float32
    (oneDNN / cuBLAS); results are rounded to the low dtype once, then converted; biases, outputs and every gradient are
    float32."""

    @staticmethod
    def forward(ctx: Any, x_low, weight, weight_low, bias, ranges, *params):
        with record_function(FOLDED_READS):
            cw, cb = params[0::2], params[1::2]
            stacked_t = weight_low.new_zeros(sum(c.shape[0] for c in cw), weight_low.shape[0])  # P^T
            row = 0
            for c, (s, e) in zip(cw, ranges, strict=True):
                stacked_t[row : row + c.shape[0], s:e].copy_(c)
                row += c.shape[0]
            # Contiguous operands throughout: oneDNN's bfloat16 products with a transposed
            # operand of this size ran up to 2x slower (measured, 2 cores).
            folded = (stacked_t @ weight_low).T.contiguous()  # (d_in, sum out)
            ctx.ranges = ranges
            ctx.has_bias = (bias is not None, tuple(b is not None for b in cb))
            ctx.save_for_backward(x_low, weight_low, stacked_t.T.contiguous(), bias, *cw)
            return torch.mm(x_low, folded).float().add_(_folded_bias(bias, ranges, cw, cb))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        with record_function(FOLDED_READS):
            x_low, weight_low, stacked, bias, *cw = ctx.saved_tensors
            has_bias, has_cb = ctx.has_bias
            grad_t = grad.to(x_low.dtype).T.contiguous()  # cast, then transpose: 3x faster than both at once
            grad_folded = grad_t @ x_low  # (sum out, d_in): the one backward read of x
            grad_b_all = grad.sum(0)
            grad_w = (stacked @ grad_folded).float() if ctx.needs_input_grad[1] else None
            want_c = any(ctx.needs_input_grad[5::2])
            grad_z = (weight_low @ grad_folded.T) if want_c else None  # (d, sum out) = (dF W^T)^T
            grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[3] and has_bias else None
            grads_c: list[torch.Tensor | None] = []
            col = 0
            for k, (c, (s, e)) in enumerate(zip(cw, ctx.ranges, strict=True)):
                cols = slice(col, col + c.shape[0])
                col += c.shape[0]
                g_b = grad_b_all[cols]
                g_c = None
                if grad_z is not None and ctx.needs_input_grad[5 + 2 * k]:
                    g_c = grad_z[s:e, cols].T.float()
                    if has_bias:
                        g_c.addr_(g_b, bias[s:e])
                grads_c += [g_c, g_b if has_cb[k] and ctx.needs_input_grad[6 + 2 * k] else None]
                if grad_bias is not None:
                    grad_bias[s:e].addmv_(c.T, g_b)
        return (None, grad_w, None, grad_bias, None, *grads_c)


def prefetch_reads(z: ModalInput, parts: Sequence[tuple[int, int, nn.Linear]]) -> ModalInput:
    """``z`` carrying ``c(z[:, s:e])`` for every ``(s, e, c)`` in ``parts``, computed in one read of ``x``.

    :func:`read_through` on the view (or on its column slices) then returns those outputs, so several consumers (SAND's
    GCN input MLP, the projection head, E1, E2) share one product with ``x`` forward and one backward
    (:class:`_FoldedReads`). A plain tensor, or a view that :meth:`LinearView.folds` would not fold, is returned
    unchanged."""
    if not isinstance(z, LinearView) or not parts or not z.folds(sum(c.out_features for _, _, c in parts)):
        return z
    pieces = _folded_read(z, parts)
    reads = {(id(c), z.start + s, z.start + e): p for (s, e, c), p in zip(parts, pieces, strict=True)}
    return replace(z, reads=reads)


def _folded_read(z: LinearView, parts: Sequence[tuple[int, int, nn.Linear]]) -> tuple[torch.Tensor, ...]:
    """``c(z[:, s:e])`` for every ``(s, e, c)`` in ``parts``, in one read of ``z.x`` (:class:`_FoldedReads`)."""
    params = [t for _, _, c in parts for t in (c.weight, c.bias)]
    ranges = tuple((s, e) for s, e, _ in parts)
    if z.x_low is None:
        out = _FoldedReads.apply(z.x, z.weight, z.bias, ranges, *params)
    else:
        weight_low = z.weight.detach().to(z.x_low.dtype) if z.weight_low is None else z.weight_low
        out = _LowFoldedReads.apply(z.x_low, z.weight, weight_low, z.bias, ranges, *params)
    return out.split([c.out_features for _, _, c in parts], dim=1)


def _head(in_dim: int, widths: Sequence[int]) -> nn.Sequential:
    """Linear -> BN -> ReLU -> ... -> Linear: widths ``in_dim -> widths[0] -> ... -> widths[-1]``."""
    layers: list[nn.Module] = []
    prev = in_dim
    for k, w in enumerate(widths):
        layers.append(nn.Linear(prev, w))
        if k < len(widths) - 1:
            layers += [nn.BatchNorm1d(w), nn.ReLU()]
        prev = w
    return nn.Sequential(*layers)


class ModalSeparation(nn.Module):
    """Split each modal representation into generic/unique parts; align and distance them.

    Args:
      dims: modality -> width of the representation ``z_m`` it will receive. Alignment needs exactly two modalities;
        SoloSim's direction is text -> image ("text" is the anchor when present, else the first listed).
      align: "solosim" (Eq. 10, default), "infonce" (symmetric, in-batch) or "none".
      distance: "club" (MI upper bound, Eq. 11-13), "l2" (Eq. 14, see ``l2_form``) or "none".
      alpha, beta: weights: ``align = alpha * L_align``, ``distance = beta * mean_m L_m``.
      tau: temperature of SoloSim/InfoNCE (0.2, the reference's config value).
      split_ratio: fraction of columns forming the generic part (0.5).
      head_dims: widths of the projection head after its input ``G_m`` (64, 64, 32).
      proj_dim: width of E1_m / E2_m (32).
      club_steps, club_lr, club_hidden: maximum-likelihood Adam steps per batch, their
        learning rate, and the hidden width of the estimator heads.
      l2_form: "neg-log" (default), "neg-mse" (the paper) or "margin"; see :func:`models.losses.l2_distance_loss`.
      solosim_scope: items SoloSim runs over: "all" (the reference: N x N logits), "batch" (the batch's items), "auto"
        (all when N <= 20,000, else batch). InfoNCE always runs in-batch.
      distance_scope: the same choice for the distancing term and the CLUB fit (the reference uses all items); "auto"
        keeps all items up to 1,000,000 (the cost is linear in N, :data:`AUTO_DISTANCE_MAX_ITEMS`).
      share_club: one estimator (and optimiser) for all modalities.
      club_fit_order: "before" (default): each batch's estimators are fitted on that batch's pairs before its bound is
        evaluated. "after" (the authors' order): the bound uses the estimators as fitted so far, and the pairs it was
        evaluated on are fitted at the next :meth:`auxiliary_step` (i.e. after the main step).

    Random permutations for the CLUB bound come from the global torch RNG."""

    def __init__(
        self, dims: Mapping[str, int], *, align: str = "solosim", distance: str = "club", alpha: float = 0.012,
        beta: float = 0.006, tau: float = 0.2, split_ratio: float = 0.5, head_dims: Sequence[int] = (64, 64, 32),
        proj_dim: int = 32, club_steps: int = 50, club_lr: float = 1e-4, club_hidden: int = 8, l2_form: str = "neg-log",
        solosim_scope: str = "auto", distance_scope: str = "auto", share_club: bool = False,
        club_fit_order: str = "before",
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("align", align, ALIGNS), ("distance", distance, DISTANCES), ("solosim_scope", solosim_scope, SCOPES),
            ("distance_scope", distance_scope, SCOPES), ("l2_form", l2_form, L2_FORMS),
            ("club_fit_order", club_fit_order, FIT_ORDERS),
        ):
            if value not in allowed:
                raise ValueError(f"ModalSeparation: {name} must be one of {allowed}; got {value!r}")
        if not 0.0 < split_ratio < 1.0:
            raise ValueError(f"ModalSeparation: split_ratio must be in (0, 1); got {split_ratio}")
        if tau <= 0:
            raise ValueError(f"ModalSeparation: tau must be > 0; got {tau}")
        self.modalities = tuple(dims)
        if align != "none" and len(self.modalities) != 2:
            raise ValueError(f"ModalSeparation: alignment needs exactly two modalities; got {self.modalities}")
        self.align, self.distance = align, distance
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.l2_form = l2_form
        self.solosim_scope, self.distance_scope = solosim_scope, distance_scope
        self.club_steps = int(club_steps)
        self.club_fit_order = club_fit_order
        #: "after" order: the detached (E1_m, E2_m) of the last bound, fitted at the next auxiliary_step
        self._pending_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.split_at: dict[str, int] = {}
        for m, d in dims.items():
            g = int(d * split_ratio)
            if not 0 < g < d:
                raise ValueError(f"ModalSeparation: '{m}' width {d} cannot be split at ratio {split_ratio}")
            self.split_at[m] = g
        anchor = "text" if "text" in self.modalities else self.modalities[0]
        self.align_pair = (anchor, next((m for m in self.modalities if m != anchor), anchor))

        self.heads = nn.ModuleDict()
        if align != "none":
            for m in self.modalities:
                self.heads[m] = _head(self.split_at[m], head_dims)
        self.e1 = nn.ModuleDict()
        self.e2 = nn.ModuleDict()
        self.club = nn.ModuleDict()
        self._club_optimisers: dict[str, torch.optim.Adam] = {}
        if distance != "none":
            for m, d in dims.items():
                self.e1[m] = nn.Linear(self.split_at[m], proj_dim)
                self.e2[m] = nn.Linear(d - self.split_at[m], proj_dim)
        if distance == "club":
            keys = ("shared",) if share_club else self.modalities
            for k in keys:
                self.club[k] = ClubEstimator(proj_dim, proj_dim, club_hidden)
                self._club_optimisers[k] = torch.optim.Adam(self.club[k].parameters(), lr=club_lr, **_FAST_ADAM)

    # ----------------------------------------------------------------- pieces
    def split(self, modality: str, z: ModalInput) -> tuple[ModalInput, ModalInput]:
        """(generic, unique) column blocks of ``z`` (tensors, or views for a LinearView)."""
        g = self.split_at[modality]
        return _columns(z, 0, g), _columns(z, g, z.shape[1])

    def full_row_consumers(self, modality: str, n_items: int) -> list[tuple[int, int, nn.Linear]]:
        """``(first column, last column + 1, layer)`` of the linear layers that read ``z_m`` on all rows.

        What :meth:`loss_terms` will read for ``n_items`` items: a backbone can compute them ahead together with its own
        consumers (:func:`prefetch_reads`)."""
        g = self.split_at[modality]
        out: list[tuple[int, int, nn.Linear]] = []
        if self.align == "solosim" and self._resolve(self.solosim_scope, n_items) == "all":
            out.append((0, g, self.heads[modality][0]))
        if self.distance != "none" and self._resolve(self.distance_scope, n_items, AUTO_DISTANCE_MAX_ITEMS) == "all":
            out += self._distance_consumers(modality)
        return out

    def _distance_consumers(self, modality: str) -> list[tuple[int, int, nn.Linear]]:
        """E1 on the generic columns, E2 on the unique ones, as ``full_row_consumers`` lists them."""
        g, e2 = self.split_at[modality], self.e2[modality]
        return [(0, g, self.e1[modality]), (g, g + e2.in_features, e2)]

    def _estimator(self, modality: str) -> ClubEstimator:
        return self.club["shared" if "shared" in self.club else modality]  # type: ignore[return-value]

    @staticmethod
    def _resolve(scope: str, n_items: int, limit: int = AUTO_SCOPE_MAX_ITEMS) -> str:
        """"all" or "batch"; ``"auto"`` means all items up to ``limit`` items."""
        if scope == "auto":
            return "all" if n_items <= limit else "batch"
        return scope

    def _rows_for(
        self, scope: str, n_items: int, batch_items: torch.Tensor, limit: int = AUTO_SCOPE_MAX_ITEMS
    ) -> torch.Tensor | None:
        """Row index for a scope: None = all items, else the sorted unique batch items."""
        return None if self._resolve(scope, n_items, limit) == "all" else torch.unique(batch_items)

    def _projections(
        self, modality: str, z: ModalInput, head_rows: torch.Tensor | None, dist_rows: torch.Tensor | None,
        want_head: bool, want_dist: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(head output, E1, E2) for one modality; linear first layers share one read of G."""
        g, q = self.split(modality, z)
        head_out = e1 = e2 = None
        same_rows = want_head and want_dist and _same(head_rows, dist_rows)
        if same_rows:
            first, e1 = read_through(_rows(g, head_rows), [self.heads[modality][0], self.e1[modality]])
            head_out = self.heads[modality][1:](first)
        else:
            if want_head:
                (first,) = read_through(_rows(g, head_rows), [self.heads[modality][0]])
                head_out = self.heads[modality][1:](first)
            if want_dist:
                (e1,) = read_through(_rows(g, dist_rows), [self.e1[modality]])
        if want_dist:
            (e2,) = read_through(_rows(q, dist_rows), [self.e2[modality]])
        if head_out is not None:
            head_out = F.normalize(head_out, dim=1)
        return head_out, e1, e2

    # ----------------------------------------------------------------- losses
    def loss_terms(self, z: Mapping[str, ModalInput], batch_items: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"align": alpha * L_align, "distance": beta * mean_m L_m}``; disabled terms are absent.

        ``z[m]``: (N, dims[m]) representation of ALL items (tensor or LinearView); ``batch_items``: item indices of the
        current batch (duplicates allowed)."""
        missing = [m for m in self.modalities if m not in z]
        if missing:
            raise ValueError(f"ModalSeparation: missing modal representation {missing[0]!r}")
        n_items = z[self.modalities[0]].shape[0]
        want_head = self.align != "none"
        want_dist = self.distance != "none"
        align_scope = "batch" if self.align == "infonce" else self.solosim_scope
        head_rows = self._rows_for(align_scope, n_items, batch_items) if want_head else None
        dist_rows = (
            self._rows_for(self.distance_scope, n_items, batch_items, AUTO_DISTANCE_MAX_ITEMS) if want_dist else None
        )
        heads: dict[str, torch.Tensor] = {}
        dist: list[torch.Tensor] = []
        for m in self.modalities:
            h, e1, e2 = self._projections(m, z[m], head_rows, dist_rows, want_head, want_dist)
            if h is not None:
                heads[m] = h
            if e1 is not None and e2 is not None:
                dist.append(self._distance(m, e1, e2))
        terms: dict[str, torch.Tensor] = {}
        if want_head:
            a, b = (heads[m] for m in self.align_pair)
            terms["align"] = self.alpha * self._align_loss(a, b)
        if want_dist:
            terms["distance"] = self.beta * torch.stack(dist).mean()
        return terms

    def _align_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """SoloSim or InfoNCE between the anchor's and the other modality's head outputs."""
        align_loss = solosim_loss if self.align == "solosim" else infonce_loss
        return align_loss(a, b, self.tau)

    def _distance(self, modality: str, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        if self.distance == "l2":
            return l2_distance_loss(e1, e2, self.l2_form)
        est = self._estimator(modality)
        if self.club_fit_order == "after" and torch.is_grad_enabled():
            self._pending_pairs[modality] = (e1.detach(), e2.detach())
        # Detached estimator parameters: the bound trains the encoders, never the estimator
        # (which only maximises the likelihood, in auxiliary_step).
        params = {k: v.detach() for k, v in est.named_parameters()}
        perm = torch.randperm(e1.shape[0], device=e1.device)
        return functional_call(est, params, (e1, e2, perm))

    # ----------------------------------------------------------- CLUB fitting
    def auxiliary_step(self, z_detached: Mapping[str, ModalInput], batch_items: torch.Tensor) -> dict[str, float]:
        """Fit the CLUB estimators: ``club_steps`` Adam steps maximising ``log q(E2_m | E1_m)``.

        Pairs are the detached (E1_m, E2_m) of the same modality over the distancing scope. Returns the mean
        log-likelihood per modality before the last step. The gradients are computed in closed form
        (:mod:`models.club_fit`; the same arithmetic as autograd and ``torch.optim.Adam``, which the tests check).
        Leaves the estimators' ``.grad`` at None so a trainer's optimiser that also holds these parameters never moves
        them."""
        if self.distance != "club" or self.club_steps <= 0:
            return {}
        if self.club_fit_order == "after":
            pairs, self._pending_pairs = self._pending_pairs, {}
            if not pairs:  # the first batch: no bound evaluated yet
                return {}
        else:
            pairs = self._current_pairs(z_detached, batch_items)
        return self._fit_club(pairs)

    def _current_pairs(
        self, z_detached: Mapping[str, ModalInput], batch_items: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Detached (E1_m, E2_m) per modality over the distancing scope."""
        n_items = z_detached[self.modalities[0]].shape[0]
        rows = self._rows_for(self.distance_scope, n_items, batch_items, AUTO_DISTANCE_MAX_ITEMS)
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for m in self.modalities:
                z = z_detached[m]
                if rows is None:  # E1 and E2 from one read of a LinearView's inputs
                    z = prefetch_reads(z, self._distance_consumers(m))
                _, e1, e2 = self._projections(m, z, None, rows, False, True)
                assert e1 is not None and e2 is not None
                pairs[m] = (e1.detach(), e2.detach())
        return pairs

    def _fit_club(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Fit by :func:`models.club_fit.fit_clubs` (closed form, flat Adam, the estimators side by side)."""
        groups = {k: [m for m in self.modalities if k in ("shared", m)] for k in self._club_optimisers}
        jobs = [(self.club[k], self._club_optimisers[k], [pairs[m] for m in ms]) for k, ms in groups.items()]
        results = fit_clubs(jobs, self.club_steps)  # type: ignore[arg-type]
        lls: dict[str, float] = {}
        for modalities, values in zip(groups.values(), results, strict=True):
            lls.update(zip(modalities, values, strict=True))
        return {f"club_ll_{m}": lls[m] for m in self.modalities}

    def auxiliary_state_dict(self) -> dict[str, Any]:
        """The CLUB optimisers' states (estimator weights are in the module's state_dict) and pairs awaiting a fit."""
        return {
            "club_optimisers": {k: opt.state_dict() for k, opt in self._club_optimisers.items()},
            "pending_pairs": {m: list(pair) for m, pair in self._pending_pairs.items()},
        }

    def load_auxiliary_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("club_optimisers", {})
        if set(saved) != set(self._club_optimisers):
            raise ValueError(
                f"ModalSeparation: checkpoint has CLUB optimisers {sorted(saved)}, "
                f"model has {sorted(self._club_optimisers)}"
            )
        for k, opt in self._club_optimisers.items():
            opt.load_state_dict(saved[k])
        self._pending_pairs = {m: (pair[0], pair[1]) for m, pair in state.get("pending_pairs", {}).items()}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
