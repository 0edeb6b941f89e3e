"""Analysis of the tracked runs: the paper's figures and tables (``python -m analysis.report``)."""
