"""Stage 7, extraction: the frozen extraction config (``config``) and the per-slide
pipeline that opens, plans, segments, measures and writes a slide (``extract``).

May use: every stage below it (``common`` to ``measure``).
"""
