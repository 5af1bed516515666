"""Runs over many configurations and their products: the paper's grids, reference numbers, report tables and figures."""
