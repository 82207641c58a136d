"""GeoJSON Features that QuPath (0.4 to 0.6) reads as detections, built a table batch at a time.

Every feature is assembled column-wise with Arrow string kernels (numbers are formatted by
Arrow's shortest round-trip conversion), so no Python code runs per nucleus except one
SHA-1 update for its id. The rules QuPath's GeoJSON reader applies, and what we write:

* ``properties.objectType`` is ``"detection"``;
* ``properties.classification`` is an object with both ``name`` and ``color`` (``[r, g, b]``);
  a name alone does not parse. Classes: ``Artefact: <kind>`` for a nucleus with a non-null
  ``artefact``, else ``Lymphocyte-like`` where a ``lymphocyte_like`` column is true, else
  ``Nucleus`` (``classes``);
* the Feature's ``id`` is kept only when it is a UUID: ``uuid5(NUCLEUS_NAMESPACE,
  "<slide_id>/<nucleus_id>")``, so a re-export gives every nucleus the same id;
* ``properties.measurements`` is an object of numbers only: a non-finite value is left out;
* coordinates are level-0 pixels, origin at the image's top left (the table's own), exterior
  ring only, closed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
from numpy.typing import NDArray

#: Namespace of the nucleus UUIDs: ``uuid5(NUCLEUS_NAMESPACE, f"{slide_id}/{nucleus_id}")``.
NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/nucleiscope/nucleus")

#: Table column -> QuPath measurement name (QuPath's own style: compartment, quantity, unit).
MEASUREMENTS: tuple[tuple[str, str], ...] = (
    ("nucleus_id", "Nucleus ID"),
    ("area_um2", "Nucleus: Area µm^2"),
    ("perimeter_um", "Nucleus: Perimeter µm"),
    ("equivalent_diameter_um", "Nucleus: Equivalent diameter µm"),
    ("major_axis_um", "Nucleus: Major axis µm"),
    ("minor_axis_um", "Nucleus: Minor axis µm"),
    ("eccentricity", "Nucleus: Eccentricity"),
    ("solidity", "Nucleus: Solidity"),
    ("circularity", "Nucleus: Circularity"),
    ("orientation_deg", "Nucleus: Orientation degrees"),
    ("hematoxylin_od_mean", "Nucleus: Hematoxylin OD mean"),
    ("hematoxylin_od_std", "Nucleus: Hematoxylin OD std dev"),
    ("eosin_od_mean", "Nucleus: Eosin OD mean"),
    ("eosin_od_std", "Nucleus: Eosin OD std dev"),
)

#: Columns the features are built from (those of ``MEASUREMENTS`` a file lacks are left out).
REQUIRED_COLUMNS = ("nucleus_id", "geometry")
OPTIONAL_COLUMNS = ("artefact", "lymphocyte_like", *(c for c, _ in MEASUREMENTS if c != "nucleus_id"))


@dataclass(frozen=True)
class QupathClass:
    """A QuPath classification: its name and display colour (RGB, 0-255)."""

    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not self.name or len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"a class needs a name and an RGB colour of 0-255 ints, got {self!r}")

    def json(self) -> str:
        return json.dumps({"name": self.name, "color": [int(c) for c in self.color]}, ensure_ascii=False)


NUCLEUS = QupathClass("Nucleus", (0, 200, 0))
LYMPHOCYTE_LIKE = QupathClass("Lymphocyte-like", (30, 90, 255))
#: ``artefact`` value -> its class; a value not listed gets ``Artefact: <value>`` in grey.
ARTEFACTS: Mapping[str, QupathClass] = {
    "pigment": QupathClass("Artefact: pigment", (150, 90, 30)),
    "eosinophilic": QupathClass("Artefact: eosinophilic", (255, 80, 170)),
    "detached": QupathClass("Artefact: detached", (140, 140, 140)),
    "low_contrast": QupathClass("Artefact: low_contrast", (255, 200, 0)),
}
OTHER_ARTEFACT_COLOR = (100, 100, 100)


def artefact_class(kind: str) -> QupathClass:
    """The class of a nucleus whose ``artefact`` is ``kind``."""
    return ARTEFACTS.get(kind) or QupathClass(f"Artefact: {kind}", OTHER_ARTEFACT_COLOR)


def nucleus_uuids(slide_id: str, nucleus_ids: NDArray[np.int64]) -> pa.StringArray:
    """``str(uuid5(NUCLEUS_NAMESPACE, f"{slide_id}/{i}"))`` for every id, hex formatted vectorised."""
    base = hashlib.sha1(NUCLEUS_NAMESPACE.bytes + f"{slide_id}/".encode())
    digests = bytearray()
    for value in nucleus_ids.tolist():
        h = base.copy()
        h.update(str(value).encode())
        digests += h.digest()[:16]
    raw = np.frombuffer(bytes(digests), np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.frombuffer(raw.tobytes().hex().encode(), np.uint8).reshape(-1, 32)
    text = np.full((len(raw), 36), ord("-"), np.uint8)
    for start, stop, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at:at + stop - start] = hexed[:, start:stop]
    offsets = np.arange(len(raw) + 1, dtype=np.int32) * 36
    return pa.StringArray.from_buffers(len(raw), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _numbers(values: pa.Array) -> pa.Array:
    """JSON number text of each value; null where the value is null, NaN or infinite."""
    floats = pc.cast(values, pa.float64())
    text = pc.cast(floats, pa.string())
    return pc.if_else(pc.is_finite(floats), text, pa.scalar(None, pa.string()))


def _join(*parts: pa.Array | str, skip_nulls: bool = False, separator: str = "") -> pa.Array:
    handling = "skip" if skip_nulls else "emit_null"
    return pc.binary_join_element_wise(*parts, separator, null_handling=handling)


def _classifications(batch: pa.RecordBatch) -> pa.Array:
    n = batch.num_rows
    names = batch.schema.names
    result = pa.array([NUCLEUS.json()] * n, pa.string()) if n else pa.array([], pa.string())
    if "lymphocyte_like" in names:
        lymph = pc.fill_null(pc.cast(batch.column("lymphocyte_like"), pa.bool_()), False)
        result = pc.if_else(lymph, LYMPHOCYTE_LIKE.json(), result)
    if "artefact" in names:
        artefact = batch.column("artefact")
        for kind in pc.unique(pc.drop_null(artefact)).to_pylist():
            result = pc.if_else(pc.fill_null(pc.equal(artefact, kind), False), artefact_class(kind).json(), result)
    return result


def _measurements(batch: pa.RecordBatch) -> pa.Array:
    names = batch.schema.names
    pieces = [_join(json.dumps(label, ensure_ascii=False) + ":", _numbers(batch.column(column)))
              for column, label in MEASUREMENTS if column in names]  # fmt: skip
    if not pieces:
        return pa.array(["{}"] * batch.num_rows, pa.string())
    inner = _join(*pieces, skip_nulls=True, separator=",")
    return _join("{", pc.fill_null(inner, ""), "}")


def _rings(geometry: pa.Array, offset_px: tuple[float, float]) -> pa.Array:
    """``[[x,y],...]`` text of each outline's exterior ring (closed), shifted by ``-offset_px``."""
    shapes = shapely.from_wkb(np.asarray(geometry.to_numpy(zero_copy_only=False)))
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(shapes), return_index=True)
    coords = coords - np.asarray(offset_px, np.float64)
    points = _join("[", pc.cast(pa.array(coords[:, 0]), pa.string()), ",",
                   pc.cast(pa.array(coords[:, 1]), pa.string()), "]")  # fmt: skip
    counts = np.bincount(index, minlength=len(shapes))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), points), ",")


def features(batch: pa.RecordBatch, slide_id: str, offset_px: tuple[float, float] = (0.0, 0.0)) -> pa.Array:
    """One GeoJSON Feature text per row of a nucleus table batch (``nucleus_id``, ``geometry``,
    and whichever of ``OPTIONAL_COLUMNS`` it has)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.schema.names]
    if missing:
        raise ValueError(f"nucleus table lacks the columns {missing}")
    ids = nucleus_uuids(slide_id, batch.column("nucleus_id").to_numpy(zero_copy_only=False).astype(np.int64))
    return _join(
        '{"type":"Feature","id":"', ids,
        '","geometry":{"type":"Polygon","coordinates":[[', _rings(batch.column("geometry"), offset_px),
        ']]},"properties":{"objectType":"detection","classification":', _classifications(batch),
        ',"measurements":', _measurements(batch), "}}",
    )  # fmt: skip


def joined(texts: pa.Array, separator: str = ",\n") -> pa.Buffer:
    """The texts joined by ``separator``: one UTF-8 buffer (write it as it is, no copy)."""
    if len(texts) == 0:
        return pa.py_buffer(b"")
    offsets = pa.array([0, len(texts)], pa.int32())
    whole = pc.binary_join(pa.ListArray.from_arrays(offsets, texts), separator)[0]
    return whole.as_buffer()
