"""Stage 2, tissue and tiling: the tissue mask of a low-resolution view (``tissue``) and
tile plans at a segmenter's working resolution with the core-ownership rule (``plan``).

May use: ``common``.
"""
