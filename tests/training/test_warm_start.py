"""warm_state: which weights a warm start copies, row by row or whole."""

from __future__ import annotations

import numpy as np
import torch

from sand.pipeline.training.warm_start import warm_state


def test_rows_by_kind_whole_by_shape_and_names_break_ties():
    new = {"user_embedding.weight": torch.zeros(3, 2), "item_embedding.weight": torch.zeros(3, 2),
           "proj.weight": torch.zeros(4, 4), "head.bias": torch.zeros(5), "step": torch.tensor(0)}
    old = {"user_embedding.weight": torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
           "item_embedding.weight": torch.tensor([[7.0, 7.0], [8.0, 8.0]]),
           "proj.weight": torch.ones(4, 4), "head.bias": torch.ones(6), "step": torch.tensor(9)}
    # 3 users and 3 items now, 2 of each before: the first dimension alone cannot tell them apart
    rows = {"user": (3, 2, np.array([2, 0]), np.array([0, 1])), "item": (3, 2, np.array([1]), np.array([1]))}
    state, copied = warm_state(new, old, rows)
    assert state["user_embedding.weight"].tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
    assert state["item_embedding.weight"].tolist() == [[0.0, 0.0], [8.0, 8.0], [0.0, 0.0]]
    assert torch.equal(state["proj.weight"], torch.ones(4, 4))  # same shape: copied whole
    assert torch.equal(state["head.bias"], torch.zeros(5))  # another shape: kept fresh
    assert int(state["step"]) == 0  # scalars are not weights to inherit
    assert copied == {"whole": 1, "user_rows": 2, "item_rows": 1}
    assert new["user_embedding.weight"].abs().sum() == 0  # the given state is left as it was
