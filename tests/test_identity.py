"""A run's identity: what its hash covers, what its nucleus files say, and that on the CPU a
nucleus file is byte-identical in process and on Ray, whatever the batching, for every segmenter."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nucleiscope.jobs.run_local import run_cohort_local
from nucleiscope.jobs.run_ray import RayOptions, run_cohort_ray
from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.extraction.config import ExtractConfig
from nucleiscope.pipeline.extraction.identity import nucleiscope_version, run_identity
from nucleiscope.pipeline.segmentation.registry import make_segmenter, shipped_weights
from nucleiscope.pipeline.slides.inputs import SlideInput, stable_slide_id
from tests.synthetic import write_synthetic_slide


def neural(name: str) -> str:
    path = shipped_weights(name)
    if path is None:
        pytest.skip(f"no shipped {name} weights")
    return path


def test_the_same_weights_at_another_path_are_the_same_model(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "student.safetensors"
    copy.parent.mkdir()
    shutil.copy(neural("student"), copy)
    config = ExtractConfig(segmenter="student", model_path=neural("student"))
    moved = replace(config, model_path=str(copy))
    a = run_identity(config, make_segmenter("student", config.model_path, device="cpu"))
    b = run_identity(moved, make_segmenter("student", moved.model_path, device="cpu"))
    assert a == b
    # tta None means the student's default (off): the same rows as tta False, the same hash
    off = replace(config, tta=False)
    assert run_identity(off, make_segmenter("student", config.model_path, tta=False, device="cpu")) == a
    on = replace(config, tta=True)
    assert run_identity(on, make_segmenter("student", config.model_path, tta=True, device="cpu")) != a


def test_the_hash_covers_version_device_precision_and_resolved_config() -> None:
    config = ExtractConfig(segmenter="attention", model_path=neural("attention"))
    segmenter = make_segmenter("attention", config.model_path, device="cpu")
    cpu, cuda = run_identity(config, segmenter), run_identity(config, segmenter, "cuda")
    assert (cpu.device, cpu.precision, cuda.device, cuda.precision) == ("cpu", "fp32", "cuda", "bf16")
    assert cpu.config_hash != cuda.config_hash
    assert cpu.nucleiscope_version == nucleiscope_version() != ""
    classical = make_segmenter("classical")
    explicit = ExtractConfig(seg_mpp=classical.mpp)  # the default, written out: the same run
    assert run_identity(explicit, classical) == run_identity(ExtractConfig(), classical)
    assert run_identity(ExtractConfig(tile_px=512), classical) != run_identity(ExtractConfig(), classical)


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory: pytest.TempPathFactory) -> SlideInput:
    path = tmp_path_factory.mktemp("identity") / "tiny.svs"
    write_synthetic_slide(str(path), width_px=560, height_px=540, mpp=0.25, tile_px=256, min_level_px=256, seed=7)
    return SlideInput(str(path), stable_slide_id(str(path)), None)


def nuclei_file(out: Path, slide_id: str) -> Path:
    (path,) = (out / "nuclei" / f"slide_id={slide_id}").iterdir()
    return path


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("name", ["classical", "attention", "student"])
def test_nucleus_files_are_byte_identical_in_process_and_on_ray(
    name: str, tiny_slide: SlideInput, tmp_path: Path,
) -> None:
    model = None if name == "classical" else neural(name)
    # attention without its default 8-pass TTA: the same code path, an eighth of the CPU time
    tta = False if name == "attention" else None
    config = ExtractConfig(segmenter=name, model_path=model, tile_px=256 if model is None else 512, tta=tta)
    segmenter = make_segmenter(name, model, tta=tta, device="cpu")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    run_cohort_local([tiny_slide], str(local), config, segmenter, show_progress=False)
    options = RayOptions(tiles_per_batch=3, max_batches=2, actors=1)
    result = run_cohort_ray([tiny_slide], str(on_ray), config, segmenter, options=options, show_progress=False)
    assert (result.done, result.failed) == (1, 0)
    a, b = nuclei_file(local, tiny_slide.slide_id), nuclei_file(on_ray, tiny_slide.slide_id)
    assert pq.read_metadata(a).num_rows > 0
    assert a.read_bytes() == b.read_bytes()
    own = json.loads(pq.read_schema(a).metadata[b"nucleiscope"])
    identity = run_identity(config, segmenter)
    assert own == {**identity.metadata(), "slide_id": tiny_slide.slide_id, "format_version": "1",
                   "mpp": 0.25, "seg_mpp": segmenter.mpp}  # fmt: skip
    run_json = json.loads((on_ray / "run.json").read_text())
    assert (run_json["config_hash"], run_json["device"]) == (identity.config_hash, "cpu")
    with pytest.raises(ConfigError, match="another configuration"):
        run_cohort_local([tiny_slide], str(local), replace(config, tile_px=config.tile_px + 64), segmenter,
                         show_progress=False)
