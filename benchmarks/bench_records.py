"""How long a rerun takes to start on S3: reading 2,000 slide records and fingerprinting 2,000 slides.

    python benchmarks/bench_records.py [--records 2000] [--repeats 3] [--latency-ms 20]

Against a moto S3 server on 127.0.0.1 (no network) behind a proxy that delays every answer by
``--latency-ms`` (an S3 round trip is 10-30 ms; moto alone answers in about 1 ms and serialises
on its own GIL), prints the median of ``--repeats`` runs of: reading every record one GET at a
time (how records were read before), reading them with one batched ``cat``
(``read_slide_records``, concurrent), and the whole resume decision of a rerun (``pending_items``:
reconcile, records, and the fingerprint of every slide, concurrently).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nucleiscope.jobs.run_local import pending_items
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.extraction.identity import RunIdentity
from nucleiscope.pipeline.measure.outputs import read_slide_records
from nucleiscope.pipeline.slides.fingerprint import fingerprints
from nucleiscope.pipeline.slides.inputs import SlideInput, stable_slide_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package
from medians import median_seconds  # noqa: E402 (this folder)

from tests.s3util import FlakyS3Proxy, moto_s3, new_bucket  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    with moto_s3() as endpoint, FlakyS3Proxy(endpoint.url, fault_share=0.0, latency_s=args.latency_ms / 1e3) as proxy:
        bucket = new_bucket(endpoint)
        options = proxy.storage_options()
        client = endpoint.client()
        items = [SlideInput(u, stable_slide_id(u)) for u in
                 (f"s3://{bucket}/cohort/slide-{k:05d}.svs" for k in range(args.records))]  # fmt: skip
        identity = RunIdentity("bench", "classical", "m", "0", "cpu", "fp64")

        def put(item: SlideInput) -> None:
            key = item.uri.split("/", 3)[3]
            client.put_object(Bucket=bucket, Key=key, Body=b"slide")
            record = {"slide_id": item.slide_id, "uri": item.uri, "config_hash": "bench", "mpp_override": None,
                      "nuclei_file": "part-x.parquet", "finished_at": "2026-12-01T00:00:00+00:00"}
            client.put_object(Bucket=bucket, Key=f"out/_records/slides/{item.slide_id}.json",
                              Body=json.dumps(record).encode())  # fmt: skip

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, items))
        prints = fingerprints([i.uri for i in items], options)
        for item in items:  # records now carry the fingerprints the slides have
            record = {"slide_id": item.slide_id, "uri": item.uri, "config_hash": "bench", "mpp_override": None,
                      "fingerprint": prints[item.uri], "nuclei_file": "part-x.parquet",
                      "finished_at": "2026-12-01T00:00:00+00:00"}
            client.put_object(Bucket=bucket, Key=f"out/_records/slides/{item.slide_id}.json",
                              Body=json.dumps(record).encode())  # fmt: skip
        out = f"s3://{bucket}/out"

        def serial() -> None:
            fs = s3fs.S3FileSystem(**options)
            paths = fs.glob(f"{bucket}/out/_records/slides/*.json")
            [json.loads(fs.cat_file(p)) for p in paths]

        config = ExtractConfig(storage_options=options)
        figures = {
            "records, one GET at a time (before)": median_seconds(serial, args.repeats),
            "records, batched cat (read_slide_records)": median_seconds(
                lambda: read_slide_records(out, storage_options=options), args.repeats),
            "whole resume decision (pending_items)": median_seconds(
                lambda: pending_items(items, out, identity, config), args.repeats),
        }
        assert pending_items(items, out, identity, config) == []  # every slide is done and unchanged
    print(f"{args.records} records and slides on moto S3, {args.latency_ms:g} ms a request, median of {args.repeats}:")
    for name, seconds in figures.items():
        print(f"  {name:45s} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
