"""Stage 0, shared ground: the exception types, fsspec storage (local or s3://, atomic
writes), credential redaction, the one reader of plain image files, TOML files, config checks,
and torch device helpers.

May use: nothing else of the package (every other stage may use it).
"""
