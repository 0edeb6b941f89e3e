"""Analysis of the tracked runs: the paper's figures and tables (``fedtune report``)."""
