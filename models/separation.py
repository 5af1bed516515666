"""SAND's reusable split / align / distance component (docs/model.md). Fast path (departure 11): every consumer of a
modal representation ``z_m`` is linear, so a ``z_m = X_m W^T + b`` passed unevaluated as a :class:`LinearView` is read
through folded weights ``X_m (W^T C^T)``, far cheaper over all items; plain tensors (what the plug-ins pass) give the
same function."""

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

from sand.models.base import take_rows
from sand.models.club_fit import fit_clubs
from sand.models.losses import L2_FORMS, ClubEstimator, infonce_loss, l2_distance_loss, solosim_loss
from sand.models.precision import low_linear

ALIGNS = ("solosim", "infonce", "none")
DISTANCES = ("club", "l2", "none")
SCOPES = ("auto", "all", "batch")
FIT_ORDERS = ("before", "after")  #: CLUB fit before or after the bound that uses its pairs (docs/model.md, departure 4)
#: ``solosim_scope="auto"`` runs over all items up to this catalogue size, else over the batch's: over all items SoloSim
#: costs N^2 (d + 1) multiply-adds thrice per batch (the literal form: 4 N^2 bytes per copy, 2.1 GB at 23,033 items).
AUTO_SCOPE_MAX_ITEMS = 20_000
#: ``distance_scope="auto"`` runs over all items up to this catalogue size: the distancing term and the CLUB fit take
#: about 1.5 KB per item and modality at their peak, so 3 GB at 1,000,000 items (docs/model.md, "Scopes").
AUTO_DISTANCE_MAX_ITEMS = 1_000_000
#: Profiler label of the folded reads, forward and backward (benchmarks/bench_sand_speed.py reads it).
FOLDED_READS = "sand::folded_reads"
#: Fused Adam: the CLUB optimisers step 50 times per batch, and the default per-parameter loop costs more than a step.
_FAST_ADAM: dict[str, Any] = {"fused": True}


@dataclass(frozen=True)
class LinearView:
    """``z = x @ weight.T + bias``, unevaluated so linear consumers can fold the weights (column slices slice
    ``weight``, row slices ``x``). ``reads``: outputs computed ahead (:func:`prefetch_reads`), keyed
    ``(id(consumer), start, stop)``. With ``x_low`` (a low-precision copy of a fixed ``x``) products run in its dtype
    and ``x`` gets no gradient."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    fold: bool | None = None  #: None: the cheaper evaluation order (:meth:`folds`); True/False force it
    start: int = 0  #: column offset in the view this one was sliced from (keys ``reads``)
    reads: Mapping[tuple[int, int, int], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    x_low: torch.Tensor | None = field(default=None, compare=False, repr=False)
    weight_low: torch.Tensor | None = field(default=None, compare=False, repr=False)  #: cast on use if None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.x.shape[0]), int(self.weight.shape[0]))

    def rows(self, index: torch.Tensor) -> LinearView:
        x_low = None if self.x_low is None else self.x_low[index]
        return replace(self, x=self.x[index], reads=None, x_low=x_low)

    def columns(self, start: int, stop: int) -> LinearView:
        bias = None if self.bias is None else self.bias[start:stop]
        weight_low = None if self.weight_low is None else self.weight_low[start:stop]
        return replace(self, weight=self.weight[start:stop], bias=bias, start=self.start + start, weight_low=weight_low)

    def folds(self, n_out: int) -> bool:
        """Whether consumers with ``n_out`` outputs in all read ``x`` through folded weights: whichever order takes
        fewer multiply-adds (folding wins for many rows, e.g. all items of a catalogue)."""
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
    return z.rows(index) if isinstance(z, LinearView) else take_rows(z, index)


def _columns(z: ModalInput, start: int, stop: int) -> ModalInput:
    return z.columns(start, stop) if isinstance(z, LinearView) else z[:, start:stop]


def read_through(z: ModalInput, consumers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """``[c(z) for c in consumers]``; for a :class:`LinearView` one folded product ``x @ (W^T [C_1^T ... C_k^T])``,
    unless :meth:`LinearView.folds` says forming ``z`` is cheaper."""
    if not isinstance(z, LinearView):
        return [c(z) for c in consumers]
    stop = z.start + z.weight.shape[0]
    if z.reads is not None and all((id(c), z.start, stop) in z.reads for c in consumers):
        return [z.reads[(id(c), z.start, stop)] for c in consumers]
    if not z.folds(sum(c.out_features for c in consumers)):
        dense = z.dense()
        return [c(dense) for c in consumers]
    return list(_folded_read(z, [(0, z.weight.shape[0], c) for c in consumers]))


class _FoldedReads(torch.autograd.Function):
    """``x @ cat_k(C_k W[s_k:e_k])^T + cat_k(C_k b[s_k:e_k] + c_k)`` with ``params`` = ``C_1, c_1, C_2, ...``, reading
    ``x`` once each way: through autograd each consumer of a slice of ``W`` reads ``x`` (skinny products, slower than
    one wide one) and fills a zero ``W``-sized gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ranges, *params):
        with record_function(FOLDED_READS):
            cw, cb = params[0::2], params[1::2]
            # (d_in, sum out) in this layout: MKL ran ``x @ folded`` and ``W^T C^T`` faster than the transposed forms.
            folded = torch.cat([weight[s:e].T @ c.T for c, (s, e) in zip(cw, ranges, strict=True)], dim=1)
            ctx.ranges = ranges
            ctx.has_bias = (bias is not None, tuple(b is not None for b in cb))
            ctx.save_for_backward(x, weight, bias, folded if ctx.needs_input_grad[0] else None, *cw)
            return torch.addmm(_folded_bias(bias, ranges, cw, cb), x, folded)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        with record_function(FOLDED_READS):
            x, weight, bias, folded, *cw = ctx.saved_tensors
            has_bias, has_cb = ctx.has_bias
            grad_folded = grad.T @ x  # (sum out, d_in): the one backward read of x
            grad_b_all = grad.sum(0)
            grad_w, full = None, None
            if ctx.needs_input_grad[1]:
                # Start from a consumer of all columns (plain product), else from zeros.
                full = next((k for k, r in enumerate(ctx.ranges) if r == (0, weight.shape[0])), None)
                if full is None:
                    grad_w = torch.zeros_like(weight)
                else:
                    row = sum(c.shape[0] for c in cw[:full])
                    grad_w = cw[full].T @ grad_folded[row : row + cw[full].shape[0]]
            grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[2] and has_bias else None
            grads_c: list[torch.Tensor | None] = []
            row = 0
            for k, (c, (s, e)) in enumerate(zip(cw, ctx.ranges, strict=True)):
                g_f, g_b = grad_folded[row : row + c.shape[0]], grad_b_all[row : row + c.shape[0]]
                row += c.shape[0]
                g_c = None
                if ctx.needs_input_grad[4 + 2 * k]:
                    g_c = (weight[s:e] @ g_f.T).T  # = g_f W^T; this order ran faster
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
    """:class:`_FoldedReads` on low-precision ``x_low`` and ``weight_low``, float32 out. The consumers are stacked in
    one block matrix ``P`` so folding, ``dW = P dF`` and ``W dF^T`` are one product each: about 20% more multiply-adds,
    but each result is converted to float32 once (on a CPU, conversions and allocations cost as much as the
    products)."""

    @staticmethod
    def forward(ctx: Any, x_low, weight, weight_low, bias, ranges, *params):
        with record_function(FOLDED_READS):
            cw, cb = params[0::2], params[1::2]
            stacked_t = weight_low.new_zeros(sum(c.shape[0] for c in cw), weight_low.shape[0])  # P^T
            row = 0
            for c, (s, e) in zip(cw, ranges, strict=True):
                stacked_t[row : row + c.shape[0], s:e].copy_(c)
                row += c.shape[0]
            # Contiguous operands throughout: oneDNN's bfloat16 products with a transposed operand ran slower here.
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
            grad_t = grad.to(x_low.dtype).T.contiguous()  # cast, then transpose: faster than both at once
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
    """``z`` carrying ``c(z[:, s:e])`` for every ``(s, e, c)`` in ``parts``, computed in one read of ``x``, for
    :func:`read_through` to return (a plain tensor, or a view that would not fold, is returned unchanged)."""
    if not isinstance(z, LinearView) or not parts or not z.folds(sum(c.out_features for _, _, c in parts)):
        return z
    pieces = _folded_read(z, parts)
    reads = {(id(c), z.start + s, z.start + e): p for (s, e, c), p in zip(parts, pieces, strict=True)}
    return replace(z, reads=reads)


def _folded_read(z: LinearView, parts: Sequence[tuple[int, int, nn.Linear]]) -> tuple[torch.Tensor, ...]:
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
    for prev, w in zip((in_dim, *widths), widths, strict=False):
        layers += [nn.Linear(prev, w), nn.BatchNorm1d(w), nn.ReLU()]
    return nn.Sequential(*layers[:-2])  # no BN and ReLU after the last layer


class ModalSeparation(nn.Module):
    """Split each modal representation by columns into generic/unique parts; align the generic parts across modalities
    (SoloSim text -> image, "text" the anchor when present; InfoNCE symmetric, in-batch) and distance each from its
    unique part, with one CLUB estimator per modality unless ``share_club`` (docs/model.md, departures 1, 4, 6, 7).
    Scopes: the items SoloSim / the distancing term and CLUB fit run over ("auto": all up to
    :data:`AUTO_SCOPE_MAX_ITEMS` / :data:`AUTO_DISTANCE_MAX_ITEMS`). ``club_fit_order="after"`` (the authors') fits the
    pairs of a bound at the next :meth:`auxiliary_step`. CLUB permutations use the global torch RNG."""

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
        self.l2_form, self.solosim_scope, self.distance_scope = l2_form, solosim_scope, distance_scope
        self.club_steps, self.club_fit_order = int(club_steps), club_fit_order
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
        heads = {m: _head(self.split_at[m], head_dims) for m in self.modalities} if align != "none" else {}
        self.heads = nn.ModuleDict(heads)
        self.e1, self.e2, self.club = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self._club_optimisers: dict[str, torch.optim.Adam] = {}
        if distance != "none":
            for m, d in dims.items():
                self.e1[m] = nn.Linear(self.split_at[m], proj_dim)
                self.e2[m] = nn.Linear(d - self.split_at[m], proj_dim)
        if distance == "club":
            for k in ("shared",) if share_club else self.modalities:
                self.club[k] = ClubEstimator(proj_dim, proj_dim, club_hidden)
                self._club_optimisers[k] = torch.optim.Adam(self.club[k].parameters(), lr=club_lr, **_FAST_ADAM)

    def split(self, modality: str, z: ModalInput) -> tuple[ModalInput, ModalInput]:
        g = self.split_at[modality]
        return _columns(z, 0, g), _columns(z, g, z.shape[1])

    def full_row_consumers(self, modality: str, n_items: int) -> list[tuple[int, int, nn.Linear]]:
        """``(first column, last column + 1, layer)`` of the linear layers :meth:`loss_terms` will read on all of
        ``n_items`` rows, so a backbone can compute them ahead with its own consumers (:func:`prefetch_reads`)."""
        out: list[tuple[int, int, nn.Linear]] = []
        if self.align == "solosim" and self._resolve(self.solosim_scope, n_items) == "all":
            out.append((0, self.split_at[modality], self.heads[modality][0]))
        if self.distance != "none" and self._resolve(self.distance_scope, n_items, AUTO_DISTANCE_MAX_ITEMS) == "all":
            out += self._distance_consumers(modality)
        return out

    def _distance_consumers(self, modality: str) -> list[tuple[int, int, nn.Linear]]:
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
        head = self.heads[modality] if want_head else None
        head_out = e1 = e2 = None
        if want_head and want_dist and _same(head_rows, dist_rows):
            first, e1 = read_through(_rows(g, head_rows), [head[0], self.e1[modality]])
            head_out = head[1:](first)
        else:
            if want_head:
                (first,) = read_through(_rows(g, head_rows), [head[0]])
                head_out = head[1:](first)
            if want_dist:
                (e1,) = read_through(_rows(g, dist_rows), [self.e1[modality]])
        if want_dist:
            (e2,) = read_through(_rows(q, dist_rows), [self.e2[modality]])
        if head_out is not None:
            head_out = F.normalize(head_out, dim=1)
        return head_out, e1, e2

    def loss_terms(self, z: Mapping[str, ModalInput], batch_items: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"align": alpha * L_align, "distance": beta * mean_m L_m}`` (disabled terms absent); ``z[m]``: ALL items'
        representation, ``batch_items``: the batch's items (duplicates allowed)."""
        missing = [m for m in self.modalities if m not in z]
        if missing:
            raise ValueError(f"ModalSeparation: missing modal representation {missing[0]!r}")
        n_items = z[self.modalities[0]].shape[0]
        want_head, want_dist = self.align != "none", self.distance != "none"
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
            terms["align"] = self.alpha * self._align_loss(*(heads[m] for m in self.align_pair))
        if want_dist:
            terms["distance"] = self.beta * torch.stack(dist).mean()
        return terms

    def _align_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        align_loss = solosim_loss if self.align == "solosim" else infonce_loss
        return align_loss(a, b, self.tau)

    def _distance(self, modality: str, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        if self.distance == "l2":
            return l2_distance_loss(e1, e2, self.l2_form)
        est = self._estimator(modality)
        if self.club_fit_order == "after" and torch.is_grad_enabled():
            self._pending_pairs[modality] = (e1.detach(), e2.detach())
        # Detached estimator parameters: the bound trains the encoders; the estimator only maximises the likelihood.
        params = {k: v.detach() for k, v in est.named_parameters()}
        perm = torch.randperm(e1.shape[0], device=e1.device)
        return functional_call(est, params, (e1, e2, perm))

    def auxiliary_step(self, z_detached: Mapping[str, ModalInput], batch_items: torch.Tensor) -> dict[str, float]:
        """Fit the CLUB estimators: ``club_steps`` Adam steps on ``log q(E2_m | E1_m)``, returning each modality's mean
        log-likelihood before the last step. Closed-form (:mod:`models.club_fit`), so ``.grad`` stays None and a
        trainer's optimiser holding these parameters never moves them."""
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
            raise ValueError(f"ModalSeparation: checkpoint has CLUB optimisers {sorted(saved)}, "
                             f"model has {sorted(self._club_optimisers)}")
        for k, opt in self._club_optimisers.items():
            opt.load_state_dict(saved[k])
        self._pending_pairs = {m: (pair[0], pair[1]) for m, pair in state.get("pending_pairs", {}).items()}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
