"""The paper's reference values, in one place for the grids and the report.

Why one module: the sensitivity grids sweep around these values and the report's sensitivity figure marks them; before,
the report imported them from the grid module, tying the report to the grid runner."""

from __future__ import annotations

#: Paper reference values of SAND's loss weights and temperature (docs/model.md).
REFERENCE = {"train.alpha": 0.012, "train.beta": 0.006, "train.tau": 0.2}
