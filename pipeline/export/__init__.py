"""Stage 10 (the top), exports of finished results for other tools: a slide's nuclei as gzipped GeoJSON
detections that QuPath imports (``geojson`` builds the features column-wise, ``qupath``
selects the slides of a run and streams their files).

May use: ``common``, ``measure``.
"""
