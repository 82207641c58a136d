"""Stage 11, the report: one static HTML page (``html``) with its plots (``plots``, matplotlib) of
an output's tables, read through the storage helpers (``data``): the cohort table, each slide's QC
picture, nucleus-density maps on a 50 µm grid and size and shape histograms (``density``, streamed
slide by slide, a few columns at a time), and the failures.

May use: ``common``, ``measure``.
"""
