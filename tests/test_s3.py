"""Slides, inputs and outputs on S3 (a moto server on 127.0.0.1), with injected 500/503 faults."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from skimage.draw import disk

from nucleiscope.pipeline.common.errors import ConfigError, OutputError, SlideError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.measure.morphometrics import measure_nuclei
from nucleiscope.pipeline.measure.outputs import (
    NucleiWriter,
    consolidate,
    write_failure_record,
    write_run_json,
    write_slide_record,
)
from nucleiscope.pipeline.slides.inputs import SlideInput, expand_inputs, stable_slide_id
from nucleiscope.pipeline.slides.slide import Slide
from tests.synthetic import SyntheticTruth

from .s3util import FlakyS3Proxy, S3Endpoint, put_bytes, storage_options_for, upload

RETRIES = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 10}}}
#: (x_px, y_px, width, height, mpp): level 0 whole, a fractional upsampled window, a border window.
REGIONS = [(0.0, 0.0, 3000, 2500, 0.25), (10.5, 20.0, 300, 200, 0.7), (-50.0, 2400.0, 256, 256, 1.0)]


def read_regions(uri: str, options: dict[str, Any] | None) -> list[np.ndarray]:
    with Slide.open(uri, storage_options=options) as slide:
        return [slide.read_region(*r) for r in REGIONS] + [slide.thumbnail(8.0)]


@pytest.fixture
def s3_slide(s3_server: S3Endpoint, s3_bucket: Callable[[], str], synthetic_slide: SyntheticTruth) -> str:
    """The synthetic slide at s3://<fresh bucket>/slides/synthetic.svs."""
    return upload(s3_server, [synthetic_slide.path], f"s3://{s3_bucket()}/slides/")[0]


@pytest.fixture(scope="module")
def local_pixels(synthetic_slide: SyntheticTruth) -> list[np.ndarray]:
    return read_regions(synthetic_slide.path, None)


def test_slide_over_s3_reads_like_the_local_file(
    s3_server: S3Endpoint, s3_slide: str, synthetic_slide: SyntheticTruth, local_pixels: list[np.ndarray]
) -> None:
    with Slide.open(s3_slide, storage_options=s3_server.storage_options) as remote, \
            Slide.open(synthetic_slide.path) as local:  # fmt: skip
        assert remote.info.uri == s3_slide
        assert {**vars(remote.info), "uri": ""} == {**vars(local.info), "uri": ""}
    for got, expected in zip(read_regions(s3_slide, s3_server.storage_options), local_pixels):
        np.testing.assert_array_equal(got, expected)


def test_injected_faults_are_retried_with_identical_pixels(
    s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy], local_pixels: list[np.ndarray]
) -> None:
    proxy = flaky_s3(fault_share=0.2, seed=11)
    # small blocks: many ranged GETs, so that faults hit HEADs and GETs alike
    options = proxy.storage_options(default_cache_type="blockcache", default_block_size=256 << 10, **RETRIES)
    for got, expected in zip(read_regions(s3_slide, options), local_pixels):
        np.testing.assert_array_equal(got, expected)
    assert proxy.faults_by_status[503] > 0 and proxy.faults_by_status[500] > 0
    assert proxy.ranged_gets > 5


def test_without_retries_an_injected_fault_surfaces(s3_slide: str, flaky_s3: Callable[..., FlakyS3Proxy]) -> None:
    """The proxy's faults really reach the client: with botocore retries off, reads fail."""
    proxy = flaky_s3(fault_share=0.5, seed=0, fault_statuses=(500,))
    options = proxy.storage_options(config_kwargs={"retries": {"total_max_attempts": 1}},
                                    default_cache_type="blockcache", default_block_size=256 << 10)
    with pytest.raises(SlideError, match="slides/synthetic.svs"):
        read_regions(s3_slide, options)
    assert proxy.faults > 0


def test_proxy_forwards_requests_faithfully(
    s3_server: S3Endpoint, s3_bucket: Callable[[], str], flaky_s3: Callable[..., FlakyS3Proxy]
) -> None:
    proxy = flaky_s3(fault_share=0.0)
    bucket, payload = s3_bucket(), np.random.default_rng(1).bytes(300_000)
    via_proxy = S3Endpoint(proxy.url, proxy.storage_options()).client()
    via_proxy.put_object(Bucket=bucket, Key="k.bin", Body=payload)
    direct = s3_server.client().head_object(Bucket=bucket, Key="k.bin")
    head = via_proxy.head_object(Bucket=bucket, Key="k.bin")
    assert (head["ETag"], head["ContentLength"]) == (direct["ETag"], len(payload))
    part = via_proxy.get_object(Bucket=bucket, Key="k.bin", Range="bytes=1000-70999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-70999/{len(payload)}"
    assert part["Body"].read() == payload[1000:71000]
    assert proxy.requests["PUT"] == 1 and proxy.ranged_gets == 1 and proxy.body_bytes == 70_000


def test_aws_environment_is_used_when_no_options_are_given(
    s3_server: S3Endpoint, s3_slide: str, local_pixels: list[np.ndarray]
) -> None:
    """The standard chain: credentials, region and AWS_ENDPOINT_URL from the environment only."""
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url  # set by the s3_server fixture
    for got, expected in zip(read_regions(s3_slide, None), local_pixels):
        np.testing.assert_array_equal(got, expected)
    prefix = s3_slide.rsplit("/", 1)[0] + "/"
    code = (
        "import sys\n"
        "from nucleiscope.pipeline.slides.inputs import expand_inputs\n"
        "from nucleiscope.pipeline.slides.slide import Slide\n"
        "[item] = expand_inputs([sys.argv[1]])\n"
        "with Slide.open(item.uri) as s:\n"
        "    print(item.slide_id, s.info.width_px, int(s.read_region(900, 700, 64, 64, 0.5).sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env
    done = subprocess.run([sys.executable, "-c", code, prefix], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with Slide.open(s3_slide, storage_options=s3_server.storage_options) as slide:
        checksum = int(slide.read_region(900, 700, 64, 64, 0.5).sum())
    assert done.stdout.split() == [stable_slide_id(s3_slide), "3000", str(checksum)]


def test_expand_inputs_over_prefixes_and_globs(
    s3_server: S3Endpoint, s3_bucket: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    bucket, options = s3_bucket(), s3_server.storage_options
    for key in ("cohort/synthetic.svs", "cohort/sub/synthetic.svs", "cohort/b.tif", "cohort/notes.txt",
                "cohort/thumb.png", "other/z.svs"):
        put_bytes(s3_server, f"s3://{bucket}/{key}", b"content is not read here")
    expected = [SlideInput(u, stable_slide_id(u)) for u in (f"s3://{bucket}/cohort/b.tif",
                f"s3://{bucket}/cohort/sub/synthetic.svs", f"s3://{bucket}/cohort/synthetic.svs")]
    assert expand_inputs([f"s3://{bucket}/cohort/"], storage_options=options) == expected
    assert expand_inputs([f"s3://{bucket}/cohort"], storage_options=options) == expected  # a "directory"
    glob = expand_inputs([f"s3://{bucket}/cohort/*.svs", f"s3://{bucket}/*/z.svs"], storage_options=options)
    assert [i.uri for i in glob] == [f"s3://{bucket}/cohort/synthetic.svs", f"s3://{bucket}/other/z.svs"]
    # later listings see objects added since (s3fs caches listings in its cached instances)
    put_bytes(s3_server, f"s3://{bucket}/cohort/c.svs", b"x")
    again = expand_inputs([f"s3://{bucket}/cohort/*.svs"], storage_options=options)
    assert [i.uri.rsplit("/", 1)[1] for i in again] == ["c.svs", "synthetic.svs"]
    put_bytes(s3_server, f"s3://{bucket}/cohort/d.svs", b"x")
    again = expand_inputs([f"s3://{bucket}/cohort"], storage_options=options)
    assert [i.uri.rsplit("/", 1)[1] for i in again] == ["b.tif", "c.svs", "d.svs", "synthetic.svs", "synthetic.svs"]
    explicit = f"s3://{bucket}/cohort/not-there.svs"  # named objects are not checked here
    assert expand_inputs([explicit], storage_options=options) == [SlideInput(explicit, stable_slide_id(explicit))]
    with caplog.at_level(logging.WARNING):
        assert expand_inputs([f"s3://{bucket}/empty/"], storage_options=options) == []
    assert "no slide" in caplog.text
    with pytest.raises(ConfigError, match="cannot list") as info:
        expand_inputs([f"s3://nucleiscope-missing-{uuid.uuid4().hex[:8]}/cohort/"], storage_options=options)
    assert info.value.__cause__ is not None


def test_expand_inputs_from_s3_manifests(s3_server: S3Endpoint, s3_slide: str) -> None:
    bucket = s3_slide[5:].split("/", 1)[0]
    options = s3_server.storage_options
    csv_uri = put_bytes(s3_server, f"s3://{bucket}/slides/cohort.csv",
                        f"slide_uri,slide_id,mpp\nsynthetic.svs,case-1,0.25\n{s3_slide},,\n".encode())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"slide_uri": ["synthetic.svs"], "mpp": [0.3]}), buffer)
    parquet_uri = put_bytes(s3_server, f"s3://{bucket}/slides/more.parquet", buffer.getvalue())
    items = expand_inputs([csv_uri], storage_options=options)
    assert items == [SlideInput(s3_slide, "case-1", 0.25)]  # the repeated URI is dropped
    assert expand_inputs([parquet_uri], storage_options=options) == [SlideInput(s3_slide, stable_slide_id(s3_slide), 0.3)]
    with Slide.open(items[0].uri, storage_options=options, mpp_override=items[0].mpp) as slide:
        assert slide.info.mpp_source == "override"
    bad = put_bytes(s3_server, f"s3://{bucket}/slides/bad.csv", b"path\nx.svs\n")
    with pytest.raises(ConfigError, match="bad.csv"):
        expand_inputs([bad], storage_options=options)


def nuclei_table(slide_id: str, count: int) -> pa.Table:
    labels = np.zeros((64, 32 * count), np.int32)
    for k in range(count):
        rr, cc = disk((32, 16 + 32 * k), 6, shape=labels.shape)  # type: ignore[no-untyped-call]
        labels[rr, cc] = k + 1
    rgb = np.full(labels.shape + (3,), 180, np.uint8)
    return measure_nuclei(labels, rgb, mpp=0.5, origin_px=(0.0, 0.0), scale=2.0, slide_id=slide_id)


def test_outputs_commit_and_consolidate_on_s3(s3_server: S3Endpoint, s3_bucket: Callable[[], str]) -> None:
    bucket, options = s3_bucket(), s3_server.storage_options
    out = f"s3://{bucket}/results"
    with NucleiWriter(out, "slide-1", storage_options=options, row_group_rows=2) as writer:
        writer.write(nuclei_table("slide-1", 3))
        writer.write(nuclei_table("slide-1", 2))
        path = writer.commit()
    key = path.removeprefix(f"{bucket}/")
    assert key == f"results/nuclei/slide_id=slide-1/{writer.file_name}" and writer.file_name.startswith("part-")
    write_slide_record(out, {"slide_id": "slide-1", "nuclei_count": 5, "nuclei_file": writer.file_name},
                       storage_options=options)  # fmt: skip
    write_failure_record(out, "slide-2", "s3://in/b.svs", "open", "SlideFormatError", "not a TIFF",
                         storage_options=options)  # fmt: skip
    assert consolidate(out, storage_options=options) == (1, 1)
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert [k for k in keys if k.startswith("results/nuclei/")] == [key]
    assert not [k for k in keys if "/_tmp/" in k or k.endswith(".inprogress")]

    def table(key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))

    nuclei = table(key)
    assert nuclei.num_rows == 5 and b"geo" in nuclei.schema.metadata
    assert table("results/slides.parquet").column("nuclei_count").to_pylist() == [5]
    assert table("results/failures.parquet").column("slide_id").to_pylist() == ["slide-2"]


def test_missing_bucket_gives_output_error(s3_server: S3Endpoint) -> None:
    out = f"s3://nucleiscope-missing-{uuid.uuid4().hex[:8]}/results"
    with pytest.raises(OutputError, match="nucleiscope-missing"):
        write_run_json(out, {"a": 1}, storage_options=s3_server.storage_options)
    with pytest.raises(OutputError):
        with NucleiWriter(out, "s1", storage_options=s3_server.storage_options) as writer:
            writer.write(nuclei_table("s1", 2))
            writer.commit()


def test_credentials_never_reach_logs_or_outputs(
    s3_server: S3Endpoint, s3_slide: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole local run with distinctive credentials (moto accepts any): none in logs,
    printed output, run.json, tables or records."""
    from nucleiscope.jobs.cli import run_extract

    secrets = {"key": "AKIANUCLEISCOPE7TEST", "secret": "nucleiscope/Secret+Value9",
               "token": "FQoNucleiscopeSessionToken"}
    bucket = s3_slide[5:].split("/", 1)[0]
    options = storage_options_for(s3_server.url, **secrets)
    items = [s3_slide, f"s3://{bucket}/slides/missing.svs"]
    config = ExtractConfig(tile_px=512, storage_options=options)
    with caplog.at_level(logging.DEBUG, logger="nucleiscope"):
        assert run_extract(items, f"s3://{bucket}/out", config, local=True, show_progress=False) == 1
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert "out/run.json" in keys and "out/failures.parquet" in keys
    blobs = b"".join(client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)
    run_json = json.loads(client.get_object(Bucket=bucket, Key="out/run.json")["Body"].read())
    assert run_json["storage_options"]["secret"] == "***"
    printed = capsys.readouterr()
    for value in secrets.values():
        for where, text in (("logs", caplog.text), ("stdout", printed.out), ("stderr", printed.err)):
            assert value not in text, where
        assert value.encode() not in blobs


def test_a_presigned_url_leaves_no_secret_in_any_output(
    s3_server: S3Endpoint, s3_slide: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A slide served over HTTP by the local S3 server under a real presigned URL: its
    signature and credential reach no table, record, run.json, QC file or log line."""
    from nucleiscope.jobs.cli import main

    bucket, key = s3_slide.removeprefix("s3://").split("/", 1)
    url = s3_server.client(signature_version="s3v4").generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    secrets = [query["X-Amz-Signature"], query["X-Amz-Credential"]]
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        assert main(["extract", url, "--out", str(out), "--local", "--segmenter", "classical"]) == 0
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    # what a user sees: nucleiscope's own records at any level, everyone's from INFO up
    # (fsspec's DEBUG lines name the URLs it fetches; they are shown only when asked for)
    shown = [r for r in caplog.records if r.name.startswith("nucleiscope") or r.levelno >= logging.INFO]
    logged = "\n".join(r.getMessage() for r in shown)
    assert any(r.name.startswith("nucleiscope") for r in shown)
    for secret in secrets:
        assert secret.encode() not in written and secret not in logged
    uri = pq.read_table(out / "slides.parquet").column("uri").to_pylist()[0]
    assert "X-Amz-Signature=***" in uri and uri.startswith("http://127.0.0.1:")
