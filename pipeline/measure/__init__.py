"""Stage 6, measurement and outputs: per-nucleus morphometrics in physical units
(``morphometrics``), the artefact rules (``artefacts``), the lymphocyte-like rule
(``lymphocytes``), the per-slide summary (``summary``), the cohort table (``cohort``), the QC
picture (``qc``), and the GeoParquet tables and records (``outputs``).

May use: ``common``, ``color``.
"""
