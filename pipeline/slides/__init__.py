"""Stage 1, slide access: whole-slide images through tiffslide over fsspec (``slide``, with
what a file says about itself in ``metadata``),
the antialiased resampling between resolutions (``resample``), the brightfield check
(``brightfield``) and cohort inputs (paths, globs, prefixes, manifests; ``inputs``).

May use: ``common``.
"""
