"""Stage 6, measurement and outputs: per-nucleus morphometrics in physical units
(``morphometrics``), the per-slide summary (``summary``), the QC picture (``qc``), and the
GeoParquet tables and records (``outputs``).

May use: ``common``, ``color``.
"""
