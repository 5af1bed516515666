"""Runs over many configurations and what is made of them: the paper's grids, reference numbers, report tables and
figures."""
