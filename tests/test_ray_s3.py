"""Cohorts read from and written to S3 (a moto server on 127.0.0.1) through Ray."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from nucleiscope.jobs.cli import run_extract
from nucleiscope.pipeline.extraction.config import ExtractConfig
from tests.synthetic import SyntheticTruth

from .s3util import FlakyS3Proxy, S3Endpoint, moto_s3, new_bucket, put_bytes, upload

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[S3Endpoint]:
    with moto_s3() as ep:
        yield ep


def read_s3_table(endpoint: S3Endpoint, uri: str) -> pd.DataFrame:
    bucket, key = uri[5:].split("/", 1)
    body = endpoint.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def read_s3_nuclei(endpoint: S3Endpoint, out: str) -> pd.DataFrame:
    bucket, prefix = out[5:].split("/", 1)
    client = endpoint.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/nuclei/")["Contents"]
                  if o["Key"].endswith(".parquet") and "/_tmp/" not in o["Key"])  # fmt: skip
    frames = []
    for key in keys:
        frame = pd.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
        frame["slide_id"] = key.split("slide_id=")[1].split("/")[0]
        frames.append(frame)
    return pd.concat(frames).sort_values(["slide_id", "nucleus_id"]).reset_index(drop=True)


@pytest.mark.shared
def test_real_slides_from_s3_to_s3_and_rerun_adds_nothing(
    endpoint: S3Endpoint, slides_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(endpoint)
    upload(endpoint, sorted(slides_dir.iterdir()), f"s3://{bucket}/cohort/")
    put_bytes(endpoint, f"s3://{bucket}/cohort/corrupt.svs", b"II*\x00" + b"\x17" * 5000)
    out = f"s3://{bucket}/results"
    config = ExtractConfig(storage_options=endpoint.storage_options)
    assert run_extract([f"s3://{bucket}/cohort/"], out, config, show_progress=False) == 1
    slides = read_s3_table(endpoint, f"{out}/slides.parquet")
    failures = read_s3_table(endpoint, f"{out}/failures.parquet")
    failures = failures.assign(stem=[s.rsplit("-", 1)[0] for s in failures.slide_id]).set_index("stem")
    assert sorted(s.rsplit("-", 1)[0] for s in slides.slide_id) == ["CMU-1-Small-Region", "OS-1-detail", "small_16x16"]
    assert failures.error_type.to_dict() == {
        "corrupt": "SlideFormatError",
        "tcga-cr-7395-01a-01-ts1": "UnknownResolutionError",
        "test3-DAPI-2-387": "NotBrightfieldError",
    }
    assert all(uri.startswith(f"s3://{bucket}/cohort/") for uri in failures.uri)
    nuclei = read_s3_nuclei(endpoint, out)
    counts = {sid: n for sid, n in zip(slides.slide_id, slides.nuclei_count) if n}  # the 16x16 slide has none
    assert nuclei.groupby("slide_id").size().to_dict() == counts
    capsys.readouterr()
    assert run_extract([f"s3://{bucket}/cohort/"], out, config, show_progress=False) == 1
    assert "0 slides done, 3 failed, 3 already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_s3_nuclei(endpoint, out), nuclei)
    pd.testing.assert_frame_equal(read_s3_table(endpoint, f"{out}/slides.parquet"), slides)


def test_injected_s3_errors_are_retried_with_identical_output(
    endpoint: S3Endpoint, synthetic_slide: SyntheticTruth
) -> None:
    bucket = new_bucket(endpoint)
    upload(endpoint, [synthetic_slide.path], f"s3://{bucket}/in/")
    direct = ExtractConfig(tile_px=512, storage_options=endpoint.storage_options)
    assert run_extract([f"s3://{bucket}/in/"], f"s3://{bucket}/direct", direct, show_progress=False) == 0
    with FlakyS3Proxy(endpoint.url, fault_share=0.2, seed=3) as proxy:
        options = proxy.storage_options()  # run_extract adds botocore's standard retries for S3
        flaky = ExtractConfig(tile_px=512, storage_options=options)
        assert run_extract([f"s3://{bucket}/in/"], f"s3://{bucket}/flaky", flaky, show_progress=False) == 0
        assert proxy.faults > 5
    pd.testing.assert_frame_equal(read_s3_nuclei(endpoint, f"s3://{bucket}/flaky"),
                                  read_s3_nuclei(endpoint, f"s3://{bucket}/direct"))  # fmt: skip
