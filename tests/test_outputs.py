"""Output contract: GeoParquet nuclei dataset, records, consolidation, run.json, QC, summary."""

from __future__ import annotations

import io
import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image
from skimage.draw import disk

from nucleiscope.pipeline.common.errors import OutputError
from nucleiscope.pipeline.measure.morphometrics import NUCLEI_SCHEMA, measure_nuclei
from nucleiscope.pipeline.measure.outputs import (
    FAILURES_SCHEMA,
    NucleiWriter,
    QcCanvas,
    clear_failure_record,
    consolidate,
    drop_other_files,
    package_versions,
    read_slide_records,
    reconcile,
    write_failure_record,
    write_run_json,
    write_slide_record,
)
from nucleiscope.pipeline.measure.summary import SLIDES_SCHEMA, SUMMARY_STATS, SlideSummary


def nuclei(
    slide_id: str, count: int, origin: tuple[float, float] = (0.0, 0.0), radius: float = 6, first_id: int = 1
) -> pa.Table:
    labels = np.zeros((64, 32 * count), np.int32)
    for k in range(count):
        rr, cc = disk((32, 16 + 32 * k), radius, shape=labels.shape)
        labels[rr, cc] = first_id + k
    rgb = np.full(labels.shape + (3,), 180, np.uint8)
    return measure_nuclei(labels, rgb, mpp=0.5, origin_px=origin, scale=2.0, slide_id=slide_id)


def commit(out: str, slide_id: str, tables: list[pa.Table], **kwargs: Any) -> str:
    with NucleiWriter(out, slide_id, **kwargs) as writer:
        for table in tables:
            writer.write(table)
        return writer.commit()


def read_all(root: Path) -> dict[str, pd.DataFrame]:
    """The nuclei dataset as four readers see it, sorted for comparison."""
    frames = {
        "pandas": pd.read_parquet(root / "nuclei"),
        "pyarrow": ds.dataset(root / "nuclei", partitioning="hive").to_table().to_pandas(),
        "duckdb": duckdb.sql(
            f"SELECT * FROM read_parquet('{root}/nuclei/*/*.parquet', hive_partitioning=true)"
        ).df(),
        "geopandas": gpd.read_parquet(root / "nuclei"),
    }
    out = {}
    for name, df in frames.items():
        df = df.assign(slide_id=df["slide_id"].astype(str))
        out[name] = df.sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)
    return out


def wkb_of(value: Any) -> bytes:
    return bytes(shapely.to_wkb(value)) if isinstance(value, shapely.Geometry) else bytes(value)


@pytest.fixture()
def two_slides(tmp_path: Path) -> tuple[Path, dict[str, pa.Table]]:
    tables = {"A": [nuclei("A", 2), nuclei("A", 3, origin=(0, 200), first_id=3)], "B-1": [nuclei("B-1", 4)]}
    for slide_id, parts in tables.items():
        commit(str(tmp_path), slide_id, parts, row_group_rows=2, provenance={"config_hash": "h1", "mpp": 0.5})
    return tmp_path, {k: pa.concat_tables(v) for k, v in tables.items()}


def only_file(root: Path, slide_id: str) -> Path:
    files = list((root / "nuclei" / f"slide_id={slide_id}").iterdir())
    assert len(files) == 1, files
    return files[0]


def test_dataset_readers_agree(two_slides: tuple[Path, dict[str, pa.Table]]) -> None:
    root, tables = two_slides
    expected = {sid: t.column("geometry").to_pylist() for sid, t in tables.items()}
    for reader, df in read_all(root).items():
        assert len(df) == 9, reader
        assert df["slide_id"].value_counts().to_dict() == {"B-1": 4, "A": 5}, reader
        assert list(df.columns).count("slide_id") == 1, reader
        for sid, geoms in expected.items():
            got = [wkb_of(g) for g in df.loc[df["slide_id"] == sid, "geometry"]]
            assert [shapely.from_wkb(g).equals(shapely.from_wkb(e)) for g, e in zip(got, geoms)] == [True] * len(geoms)
    frame = read_all(root)["geopandas"]
    assert isinstance(frame, gpd.GeoDataFrame) and frame.crs is None
    assert frame.geometry.is_valid.all() and (frame.geometry.geom_type == "Polygon").all()


def test_geoparquet_metadata_and_single_file(two_slides: tuple[Path, dict[str, pa.Table]]) -> None:
    root, tables = two_slides
    path = only_file(root, "A")
    assert path.name.startswith("part-") and path.suffix == ".parquet"
    schema = pq.read_schema(path)
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert "crs" in column and column["crs"] is None
    own = json.loads(schema.metadata[b"nucleiscope"])
    assert own == {"slide_id": "A", "format_version": "1", "config_hash": "h1", "mpp": 0.5}
    single = pq.read_table(path)
    assert single.column_names == [n for n in NUCLEI_SCHEMA.names if n != "slide_id"]
    assert single.num_rows == 5
    assert single.column("area_um2").to_pylist() == tables["A"].column("area_um2").to_pylist()
    assert pq.ParquetFile(path).metadata.num_row_groups >= 2  # streamed, not buffered whole
    assert gpd.read_parquet(path).geometry.is_valid.all()


def test_recommit_retires_the_old_file_only_at_the_record_and_tmp_is_invisible(
    two_slides: tuple[Path, dict[str, pa.Table]],
) -> None:
    root, _ = two_slides
    out = str(root)
    old = only_file(root, "A")
    write_slide_record(out, {"slide_id": "A", "nuclei_file": old.name, "finished_at": "2026-01-01T00:00:00+00:00"})
    write_slide_record(out, {"slide_id": "B-1", "nuclei_file": only_file(root, "B-1").name})
    (root / "nuclei" / "slide_id=A" / "part-9.parquet").write_bytes(b"stale")
    pending = NucleiWriter(out, "C", row_group_rows=1)
    pending.write(nuclei("C", 2))  # flushed into nuclei/_tmp, not committed
    assert list((root / "nuclei" / "_tmp").rglob("*")), "expected an in-progress file"
    new = commit(out, "A", [nuclei("A", 1)]).rsplit("/", 1)[1]
    # Before the record: the old file is still the slide's, and stays; the unnamed ones go.
    assert sorted(p.name for p in (root / "nuclei" / "slide_id=A").iterdir()) == sorted([old.name, new, "part-9.parquet"])
    pending.abort()
    reconcile(out)
    assert [p.name for p in (root / "nuclei" / "slide_id=A").iterdir()] == [old.name]
    new = commit(out, "A", [nuclei("A", 1)]).rsplit("/", 1)[1]
    write_slide_record(out, {"slide_id": "A", "nuclei_file": new})  # the commit point
    drop_other_files(out, "A", new)
    assert [p.name for p in (root / "nuclei" / "slide_id=A").iterdir()] == [new]
    for reader, df in read_all(root).items():
        assert df["slide_id"].value_counts().to_dict() == {"B-1": 4, "A": 1}, reader
    assert not list((root / "nuclei" / "_tmp").rglob("*.inprogress"))
    assert not (root / "nuclei" / "slide_id=C").exists()


def test_reconcile_keeps_the_newer_of_done_and_failed(tmp_path: Path) -> None:
    out = str(tmp_path)
    file_a = commit(out, "A", [nuclei("A", 2)]).rsplit("/", 1)[1]
    file_b = commit(out, "B", [nuclei("B", 2)]).rsplit("/", 1)[1]
    write_failure_record(out, "A", "/a.tif", "open", "OSError", "failed before it was done")
    write_slide_record(out, {"slide_id": "A", "nuclei_file": file_a, "finished_at": datetime.now(timezone.utc)})
    write_slide_record(out, {"slide_id": "B", "nuclei_file": file_b, "finished_at": "2026-01-01T00:00:00+00:00"})
    (tmp_path / "qc").mkdir()
    for name in ("A", "B"):
        (tmp_path / "qc" / f"{name}.png").write_bytes(b"png")
    write_failure_record(out, "B", "/b.tif", "open", "SlideNotFoundError", "the changed file failed")
    ledger = reconcile(out)
    assert sorted(ledger.done) == ["A"] and sorted(ledger.failed) == ["B"]
    assert not (tmp_path / "_records" / "failures" / "A.json").exists()
    assert not (tmp_path / "_records" / "slides" / "B.json").exists()
    assert not (tmp_path / "nuclei" / "slide_id=B").exists()
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["A.png"]
    assert consolidate(out) == (1, 1)


def test_abort_and_context_manager(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with NucleiWriter(str(tmp_path), "X", row_group_rows=1) as writer:
            writer.write(nuclei("X", 2))
            raise RuntimeError("segmenter crashed")
    with NucleiWriter(str(tmp_path), "Y") as writer:
        writer.write(nuclei("Y", 2))  # leaves without commit
    assert not list((tmp_path / "nuclei").glob("slide_id=*"))
    assert not [p for p in (tmp_path / "nuclei").rglob("*") if p.is_file()]
    with pytest.raises(ValueError):
        writer.write(nuclei("Y", 1))


def test_writer_validates_tables(tmp_path: Path) -> None:
    with NucleiWriter(str(tmp_path), "A") as writer:
        renumbered = nuclei("A", 1).set_column(1, "nucleus_id", pa.array([42], pa.int64()))
        writer.write(renumbered)  # a nullable field after set_column is accepted
        with pytest.raises(ValueError):
            writer.write(nuclei("B", 1))
        with pytest.raises(ValueError):
            writer.write(nuclei("A", 1).drop_columns(["eosin_od_std"]))
    with pytest.raises(ValueError):
        NucleiWriter(str(tmp_path), "../escape")


def test_empty_slide_commits_a_readable_file(tmp_path: Path) -> None:
    commit(str(tmp_path), "E", [nuclei("E", 1).slice(0, 0)])
    commit(str(tmp_path), "F", [nuclei("F", 2)])
    assert pq.read_table(only_file(tmp_path, "E")).num_rows == 0
    for reader, df in read_all(tmp_path).items():
        assert df["slide_id"].tolist() == ["F", "F"], reader


def test_io_errors_become_output_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    writer = NucleiWriter(str(blocker), "A")
    with pytest.raises(OutputError) as info:
        writer.write(nuclei("A", 1))
        writer.commit()
    assert info.value.__cause__ is not None
    writer.abort()
    with pytest.raises(OutputError):
        write_run_json(str(blocker), {"a": 1})
    with pytest.raises(OutputError):
        NucleiWriter("nosuchprotocol://x", "A")


def finish(summary: SlideSummary, slide_id: str) -> dict[str, Any]:
    return summary.finish(
        slide_id=slide_id, uri=f"/data/{slide_id}.tif", width_px=1000, height_px=800, mpp=0.25,
        mpp_source="metadata", seg_mpp=0.5, segmenter="classical", model_id="abc", config_hash="h",
        tissue_area_mm2=0.02, tiles=3, seconds_total=1.5, tiles_per_s=2.0, extra_field="kept",
    )


def test_records_and_consolidate(tmp_path: Path) -> None:
    out = str(tmp_path)
    assert consolidate(out) == (0, 0)
    assert pq.read_schema(tmp_path / "slides.parquet").equals(SLIDES_SCHEMA, check_metadata=False)
    assert pq.read_schema(tmp_path / "failures.parquet").equals(FAILURES_SCHEMA, check_metadata=False)
    write_failure_record(out, "B-1", "/data/B-1.tif", "segment", "RuntimeError", "earlier attempt")
    for slide_id, count in [("A", 2), ("B-1", 3)]:
        summary = SlideSummary()
        summary.add(nuclei(slide_id, count))
        write_slide_record(out, finish(summary, slide_id))
    write_failure_record(out, "C", "/data/C.tif", "open", "SlideFormatError", "not a TIFF")
    write_failure_record(out, "D", "/data/D.tif", "read", "OSError", "gone")
    clear_failure_record(out, "D")
    clear_failure_record(out, "never-failed")
    assert consolidate(out) == (2, 1)
    slides = pq.read_table(tmp_path / "slides.parquet")
    assert slides.schema.equals(SLIDES_SCHEMA, check_metadata=False)
    assert slides.column("slide_id").to_pylist() == ["A", "B-1"]
    assert slides.column("nuclei_count").to_pylist() == [2, 3]
    assert slides.column("nuclei_per_mm2").to_pylist() == pytest.approx([100.0, 150.0])
    assert slides.column("finished_at").type == pa.timestamp("us", tz="UTC")
    failures = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    assert [(f["slide_id"], f["stage"], f["error_type"]) for f in failures] == [("C", "open", "SlideFormatError")]
    assert failures[0]["failed_at"] is not None
    assert set(read_slide_records(out)) == {"A", "B-1"}
    assert read_slide_records(out)["A"]["extra_field"] == "kept"
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_memory_filesystem_round_trip() -> None:
    out = f"memory://nucleiscope-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        path = commit(out, "M", [nuclei("M", 3)])
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        assert table.num_rows == 3
        dataset = ds.dataset("/" + out.removeprefix("memory://") + "/nuclei", filesystem=fs, partitioning="hive")
        assert dataset.to_table().column("slide_id").to_pylist() == ["M"] * 3
        summary = SlideSummary()
        summary.add(table)
        write_slide_record(out, {**finish(summary, "M"), "nuclei_file": path.rsplit("/", 1)[1]})
        write_failure_record(out, "N", "/n.tif", "open", "SlideNotFoundError", "missing")
        assert consolidate(out) == (1, 1)
        assert fs.exists(path)  # named by its record: reconcile keeps it
        write_run_json(out, {"config": {"tile_px": 1024}, "versions": package_versions()})
        assert json.loads(fs.cat_file(f"{out}/run.json"))["config"]["tile_px"] == 1024
        assert not fs.glob(f"{out}/nuclei/_tmp/**/*.inprogress")
    finally:
        if fs.exists(out):
            fs.rm(out, recursive=True)


def test_run_json_is_strict_json(tmp_path: Path) -> None:
    write_run_json(str(tmp_path), {"nan": float("nan"), "np": np.float32(1.5), "n": np.int64(3), "nested": [math.inf]})
    text = (tmp_path / "run.json").read_text()
    assert json.loads(text) == {"nan": None, "np": 1.5, "n": 3, "nested": [None]}
    assert "\n  " in text  # indented
    versions = package_versions()
    assert {"numpy", "pyarrow", "scikit-image", "nucleiscope"} <= set(versions)
    assert versions["numpy"] == np.__version__


def test_qc_canvas(tmp_path: Path) -> None:
    thumbnail = np.full((50, 80, 3), 230, np.uint8)
    canvas = QcCanvas(thumbnail, (800, 500))  # level 0: 800 x 500, thumbnail 1/10
    big = nuclei("Q", 1, origin=(300.0, 100.0), radius=12)  # ~50 px wide at level 0 -> 5 px
    small = nuclei("Q", 1, origin=(600.0, 300.0), radius=2)  # ~10 px -> a dot
    canvas.add(big)
    canvas.add(small)
    drawn = np.all(canvas.image == (0, 255, 0), axis=2)
    cx, cy = big.column("centroid_x_px")[0].as_py() / 10, big.column("centroid_y_px")[0].as_py() / 10
    rows, cols = np.nonzero(drawn[:, :60])
    assert len(rows) >= 8 and np.abs(cols + 0.5 - cx).max() < 4 and np.abs(rows + 0.5 - cy).max() < 4
    assert not drawn[int(cy), int(cx)]  # an outline, not a filled disc
    sx, sy = small.column("centroid_x_px")[0].as_py() / 10, small.column("centroid_y_px")[0].as_py() / 10
    assert drawn[int(sy), int(sx)] and drawn[:, 60:].sum() == 1
    assert np.array_equal(thumbnail, np.full((50, 80, 3), 230, np.uint8))  # input untouched
    decoded = np.asarray(Image.open(io.BytesIO(canvas.png_bytes())))
    assert decoded.shape == (50, 80, 3) and np.array_equal(decoded, canvas.image)
    path = canvas.save(str(tmp_path), "Q")
    assert Path(path) == tmp_path / "qc" / "Q.png"
    assert np.asarray(Image.open(path)).shape == (50, 80, 3)


def test_summary_statistics_against_numpy() -> None:
    rng = np.random.default_rng(3)
    columns = {name: rng.gamma(2.0, 1.0, 1001) for name in SUMMARY_STATS}
    table = pa.table({**columns, "other": np.zeros(1001)})
    summary = SlideSummary()
    for start in range(0, 1001, 300):  # streamed in chunks
        summary.add(table.slice(start, 300))
    summary.add(table.slice(0, 0))
    record = summary.finish(slide_id="S", tissue_area_mm2=0.5, seconds_read=1.0)
    assert record["nuclei_count"] == 1001
    assert record["nuclei_per_mm2"] == pytest.approx(2002.0)
    for name, values in columns.items():
        q1, median, q3 = np.quantile(values.astype(np.float32).astype(np.float64), [0.25, 0.5, 0.75])
        assert record[f"{name}_median"] == pytest.approx(median)
        assert record[f"{name}_q1"] == pytest.approx(q1)
        assert record[f"{name}_q3"] == pytest.approx(q3)
        assert record[f"{name}_iqr"] == pytest.approx(q3 - q1)
    assert record["seconds_read"] == 1.0 and record["uri"] is None
    assert set(SLIDES_SCHEMA.names) <= set(record)
    assert isinstance(record["finished_at"], str)


def test_summary_of_empty_slide_and_bad_input() -> None:
    record = SlideSummary().finish(slide_id="E", tissue_area_mm2=0.0)
    assert record["nuclei_count"] == 0 and record["nuclei_per_mm2"] is None
    assert record["area_um2_median"] is None and record["circularity_iqr"] is None
    with pytest.raises(ValueError):
        SlideSummary().finish(slide_id="E", nuclei_count=5)
    with pytest.raises(ValueError):
        SlideSummary().add(pa.table({"area_um2": [1.0]}))
