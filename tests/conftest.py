"""Shared fixtures: synthetic slides with known nuclei, deliberately bad inputs, ../shared data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import synthetic
from tests.synthetic import SyntheticTruth

from .s3util import AWS_VARS_TO_CLEAR, FlakyS3Proxy, S3Endpoint, moto_s3, new_bucket, patched_environ

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def ray_cluster() -> None:
    """One local Ray with 2 CPUs for the whole test session (started on first use)."""
    from nucleiscope.jobs.cluster import init_ray

    init_ray(num_cpus=2)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Tiny networks run far faster single-threaded (and do not fight other processes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only data directory beside the repository (skips when absent)."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared not present beside the repository")
    return SHARED_DIR


@pytest.fixture(scope="session")
def slides_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "slides"


@pytest.fixture(scope="session")
def monuseg_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "monuseg-train"


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    """3000 x 2500 px at 0.25 µm/px, levels at downsample 1, 4, 16, lossless; ``.path`` is the file."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.svs"
    return synthetic.write_synthetic_slide(path, width_px=3000, height_px=2500, mpp=0.25, min_level_px=256, seed=7)


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: SyntheticTruth) -> dict[str, Path]:
    """Files that must be refused, by the kind of failure they should produce."""
    root = tmp_path_factory.mktemp("bad")
    text = root / "notes.svs"
    text.write_text("this is a text file, not a slide\n" * 50)
    png = root / "picture.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    return {
        "missing": root / "does-not-exist.svs",
        "random_bytes": synthetic.write_random_bytes(root / "random.svs", 50_000),
        "text": text,
        "png": png,
        "truncated": synthetic.write_truncated_copy(synthetic_slide.path, root / "truncated.svs", 0.5),
        "no_resolution": synthetic.write_tiff_without_resolution(root / "no-mpp.tif"),
        "absurd_size": synthetic.write_absurd_size_tiff(root / "huge.svs"),
        "inconsistent_levels": synthetic.write_inconsistent_levels_tiff(root / "levels.svs"),
        "fluorescence": synthetic.write_fluorescence_like_slide(root / "fluorescence.svs"),
    }


@pytest.fixture(scope="session")
def big_single_level_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticTruth, int]:
    """An 8000 x 8000 single-level JPEG slide (192 MB of pixels) and the traced peak bytes of writing it."""
    import tracemalloc

    path = tmp_path_factory.mktemp("big") / "big.svs"
    tracemalloc.start()
    try:
        truth = synthetic.write_synthetic_slide(path, width_px=8000, height_px=8000, max_levels=1,
                                                compression="jpeg", seed=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return truth, peak


# --- S3 (a moto server on 127.0.0.1) ------------------------------------------------------
#
# s3fs caches filesystem instances (by their options) and, in them, listings. Test data
# is set up with plain boto3 clients (``S3Endpoint.client``), never through s3fs, and
# every test gets its own bucket, so no listing cached by an earlier test can matter.
# Where code under test lists, uploads happen and it lists again (``expand_inputs``
# globs), ``test_s3`` checks that the second listing is fresh. Instances are not made
# with ``skip_instance_cache``: uncached instances get garbage-collected mid-session and
# s3fs's session finaliser then logs event-loop errors.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """A moto S3 server for the session: ``.url``, ``.storage_options`` (explicit endpoint and
    dummy credentials), ``.env``; the AWS_* variables of ``.env`` are also set in os.environ
    for the session (the standard chain, for code and subprocesses given no options) and
    restored afterwards."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # one line per request otherwise
    try:
        with moto_s3() as endpoint, patched_environ(endpoint.env, clear=AWS_VARS_TO_CLEAR):
            yield endpoint
    finally:
        werkzeug.setLevel(level)


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint) -> Callable[[], str]:
    """Factory of fresh, uniquely named buckets on ``s3_server``."""
    return lambda: new_bucket(s3_server)


@pytest.fixture
def flaky_s3(s3_server: S3Endpoint) -> Iterator[Callable[..., FlakyS3Proxy]]:
    """Factory of ``FlakyS3Proxy`` instances in front of ``s3_server``, all stopped after the test."""
    proxies: list[FlakyS3Proxy] = []

    def make(**kwargs: object) -> FlakyS3Proxy:
        proxies.append(FlakyS3Proxy(s3_server.url, **kwargs))  # type: ignore[arg-type]
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()
