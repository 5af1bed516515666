"""Same seed, same gradients: a batch's backward gives the same bits on every run, on several CPU threads."""

from __future__ import annotations

import pytest
import torch
from test_plugins import tiny_inputs

from sand.models.base import take_rows
from sand.models.registry import MODELS, build_model


@pytest.fixture
def two_threads():
    """Two intra-op threads, as on the machines users train on: one thread hides thread-order effects."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _gradients(name: str, inputs: dict, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = build_model(name, **inputs)
    model.on_epoch_start(1, torch.Generator().manual_seed(1))
    sum(model.loss_terms(users, pos, neg).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_take_rows_backward_adds_repeated_rows_the_same_way_every_time(two_threads):
    """Advanced indexing (``x[index]``) failed this: its backward added a repeated row's gradients in thread order."""
    g = torch.Generator().manual_seed(0)
    table, upstream = torch.randn(1000, 128, generator=g), torch.randn(4096, 128, generator=g)
    index = torch.randint(0, 1000, (4096,), generator=g)  # ~4 repeats of each row
    grads = []
    for _ in range(6):
        x = table.clone().requires_grad_()
        (take_rows(x, index) * upstream).sum().backward()
        grads.append(x.grad)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_computes_the_same_gradients_twice(name, two_threads):
    inputs = tiny_inputs(n_users=600, n_items=300)
    g = torch.Generator().manual_seed(2)
    edges = inputs["train_edges"]
    pick = torch.randint(0, len(edges), (4096,), generator=g)  # users and items repeat within the batch
    users, pos = edges[pick, 0], edges[pick, 1]
    neg = torch.randint(0, inputs["n_items"], (4096,), generator=g)
    first = _gradients(name, inputs, users, pos, neg)
    for _ in range(2):
        again = _gradients(name, inputs, users, pos, neg)
        assert first.keys() == again.keys()
        assert [n for n in first if not torch.equal(first[n], again[n])] == []
