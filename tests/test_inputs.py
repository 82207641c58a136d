"""Cohort inputs (local paths, globs, directories, manifests), slide ids, credential redaction."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nucleiscope.pipeline.common.errors import ConfigError
from nucleiscope.pipeline.slides.inputs import (
    S3_RETRY_ATTEMPTS,
    SlideInput,
    expand_inputs,
    redact,
    redacted_options,
    stable_slide_id,
    with_s3_retries,
)


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """Empty files laid out like a cohort folder (inputs are not opened here)."""
    for name in ("a.svs", "b.SVS", "c.tiff", "sub/a.svs", "sub/d.ndpi", "sub/deeper/e.qptiff",
                 "notes.txt", "thumb.png", ".hidden.svs", ".cache/f.svs", "x.mrxs"):
        path = tmp_path / "cohort" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path / "cohort"


def uris(items: list[SlideInput]) -> list[str]:
    return [i.uri for i in items]


def test_directory_lists_single_file_slides_recursively_sorted(cohort: Path) -> None:
    items = expand_inputs([str(cohort)])
    rel = [os.path.relpath(u, cohort) for u in uris(items)]
    assert rel == ["a.svs", "b.SVS", "c.tiff", "sub/a.svs", "sub/d.ndpi", "sub/deeper/e.qptiff"]
    assert [i.slide_id for i in items] == [stable_slide_id(u) for u in uris(items)]
    assert [i.slide_id.rsplit("-", 1)[0] for i in items] == ["a", "b", "c", "a", "d", "e"]
    assert len({i.slide_id for i in items}) == 6
    assert all(i.mpp is None for i in items)


def test_paths_pass_through_and_repeats_are_dropped(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cohort)
    missing = str(cohort / "missing.svs")
    items = expand_inputs(["a.svs", "./a.svs", str(cohort / "a.svs"), "notes.txt", missing, "a.svs"])
    assert uris(items) == ["a.svs", "notes.txt", missing]  # explicit files are kept whatever they are
    same = stable_slide_id(str(cohort / "a.svs"))  # relative or absolute: one file, one id
    assert [i.slide_id for i in items] == [same, stable_slide_id(str(cohort / "notes.txt")), stable_slide_id(missing)]


def test_globs_local_and_recursive(cohort: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert [Path(u).name for u in uris(expand_inputs([str(cohort / "*.svs")]))] == ["a.svs"]
    deep = expand_inputs([str(cohort / "**" / "*.svs")])
    assert [os.path.relpath(u, cohort) for u in uris(deep)] == ["a.svs", "sub/a.svs"]
    with caplog.at_level(logging.WARNING):
        assert expand_inputs([str(cohort / "*.bif")]) == []
    assert "no file matches" in caplog.text


def test_file_urls(cohort: Path) -> None:
    one = f"file://{cohort}/c.tiff"
    assert uris(expand_inputs([one])) == [one]
    listed = uris(expand_inputs([f"file://{cohort}/sub/"]))
    assert listed == [f"file://{cohort}/sub/a.svs", f"file://{cohort}/sub/d.ndpi", f"file://{cohort}/sub/deeper/e.qptiff"]


def test_empty_directory_warns_and_returns_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        assert expand_inputs([str(tmp_path / "empty")]) == []
    assert "no slide" in caplog.text


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_manifest_ids_mpp_and_relative_uris(cohort: Path) -> None:
    manifest = write_csv(cohort / "manifest.csv", "slide_uri,slide_id,mpp\n"
                         "a.svs,patient-1,0.25\n"
                         f"{cohort}/sub/a.svs,,\n"
                         "s3://bucket/x/a.svs,,0.5\n"
                         "sub/d.ndpi,007,\n")
    items = expand_inputs([manifest])
    assert items == [
        SlideInput(str(cohort / "a.svs"), "patient-1", 0.25),
        SlideInput(f"{cohort}/sub/a.svs", stable_slide_id(f"{cohort}/sub/a.svs"), None),
        SlideInput("s3://bucket/x/a.svs", stable_slide_id("s3://bucket/x/a.svs"), 0.5),
        SlideInput(str(cohort / "sub" / "d.ndpi"), "007", None),  # ids stay strings ("007", not 7)
    ]


def test_parquet_manifest(cohort: Path) -> None:
    path = cohort / "manifest.parquet"
    pq.write_table(pa.table({"slide_uri": ["c.tiff", "b.SVS"], "mpp": [0.5, None]}), path)
    c, b = str(cohort / "c.tiff"), str(cohort / "b.SVS")
    assert expand_inputs([str(path)]) == [SlideInput(c, stable_slide_id(c), 0.5), SlideInput(b, stable_slide_id(b), None)]


def test_ids_depend_on_the_path_alone(cohort: Path) -> None:
    a, sub_a, d = str(cohort / "a.svs"), str(cohort / "sub" / "a.svs"), str(cohort / "sub" / "d.ndpi")
    alone = {i.uri: i.slide_id for i in expand_inputs([sub_a])}
    both = {i.uri: i.slide_id for i in expand_inputs([a, sub_a, d])}
    reversed_ = {i.uri: i.slide_id for i in expand_inputs([d, sub_a, a])}
    assert both == reversed_ and both[sub_a] == alone[sub_a] and both[a] != both[sub_a]
    assert both[a].startswith("a-") and both[sub_a].startswith("a-")
    assert stable_slide_id(f"file://{a}") == both[a]
    signed = "http://127.0.0.1:9/bucket/s.svs?X-Amz-Signature=abc&X-Amz-Date=20260101T000000Z&version=2"
    resigned = "http://127.0.0.1:9/bucket/s.svs?version=2&X-Amz-Signature=def&X-Amz-Date=20260102T000000Z"
    assert stable_slide_id(signed) == stable_slide_id(resigned) != stable_slide_id(signed.replace("version=2", "version=3"))
    manifest = write_csv(cohort / "m.csv", f"slide_uri,slide_id\nsub/d.ndpi,{both[a]}\n")
    with pytest.raises(ConfigError, match="is given to both"):
        expand_inputs([a, manifest])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("uri,slide_id\na.svs,x\n", "no 'slide_uri' column"),
        ("slide_uri,slide_id\na.svs,x\nb.svs,x\n", "slide_id 'x' is given to both"),
        ("slide_uri,mpp\na.svs,-1\n", "mpp must be positive"),
        ("slide_uri,mpp\na.svs,fast\n", "bad column values|cannot read manifest"),
        ("slide_uri,slide_id\na.svs,has space\n", "slide_id must match"),
        ("slide_uri\n\"\"\n", "empty slide_uri"),
    ],
)
def test_invalid_manifests_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    manifest = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ConfigError, match=match) as info:
        expand_inputs([manifest])
    assert "bad.csv" in str(info.value)


def test_unreadable_manifests_chain_the_cause(tmp_path: Path) -> None:
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    for path in (tmp_path / "missing.csv", tmp_path / "garbage.parquet"):
        with pytest.raises(ConfigError, match=path.name) as info:
            expand_inputs([str(path)])
        assert info.value.__cause__ is not None


def test_same_explicit_id_in_two_manifests_is_refused(tmp_path: Path) -> None:
    one = write_csv(tmp_path / "one.csv", "slide_uri,slide_id\na.svs,p1\n")
    two = write_csv(tmp_path / "two.csv", "slide_uri,slide_id\nb.svs,p1\n")
    with pytest.raises(ConfigError, match="'p1'"):
        expand_inputs([one, two])


def test_slide_input_validates() -> None:
    assert SlideInput("a.svs", "a").mpp is None
    for bad in ({"uri": "", "slide_id": "a"}, {"uri": "a.svs", "slide_id": "a/b"},
                {"uri": "a.svs", "slide_id": ".."}, {"uri": "a.svs", "slide_id": "a", "mpp": 0.0},
                {"uri": "a.svs", "slide_id": "a", "mpp": float("nan")}):
        with pytest.raises(ConfigError):
            SlideInput(**bad)
    with pytest.raises(ConfigError, match="sequence"):
        expand_inputs("a.svs")


def test_redact_urls() -> None:
    assert redact("s3://AKIAXXX:wJalr/secret@bucket/key.svs") == "s3://***@bucket/key.svs"
    assert redact("failed: https://user:pa55@host:9000/b/k and http://h/x") == \
        "failed: https://***@host:9000/b/k and http://h/x"
    signed = "https://b.s3.amazonaws.com/k.svs?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=abc123&partNumber=2"
    assert redact(signed) == "https://b.s3.amazonaws.com/k.svs?X-Amz-Credential=***&X-Amz-Signature=***&partNumber=2"
    plain = "s3://bucket/prefix/slide name.svs"
    assert redact(plain) == plain


def test_redacted_options_hide_every_secret() -> None:
    options = {
        "key": "AKIAEXAMPLE", "secret": "wJalrXUtnFEMI", "token": "FwoGZXIvYXdz", "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:pw@127.0.0.1:9000", "region_name": "eu-west-1",
                          "aws_session_token": "IQoJb3JpZ2lu"},
        "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 10}},
        "s3_additional_kwargs": {"SSECustomerKey": "c2VjcmV0"},
        "profile": "research", "default_block_size": 4194304,
    }
    clean = redacted_options(options)
    text = repr(clean)
    for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "FwoGZXIvYXdz", "IQoJb3JpZ2lu", "c2VjcmV0", ":pw@"):
        assert secret not in text
    assert clean["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:9000"
    assert clean["config_kwargs"] == options["config_kwargs"]
    assert (clean["anon"], clean["profile"], clean["default_block_size"]) == (False, "research", 4194304)
    assert options["key"] == "AKIAEXAMPLE"  # a copy; the input is untouched
    assert redacted_options(None) == {}


def test_s3_retry_defaults() -> None:
    added = with_s3_retries({"key": "k"}, ["s3://b/x.svs", "out/"], environ={})
    assert added["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": S3_RETRY_ATTEMPTS}
    assert added["key"] == "k"
    assert with_s3_retries({}, ["slides/", "out/"], environ={}) == {}  # nothing on S3
    mine = {"config_kwargs": {"retries": {"max_attempts": 3}, "connect_timeout": 5}}
    assert with_s3_retries(mine, ["s3://b/"], environ={}) == mine
    assert with_s3_retries({}, ["s3://b/"], environ={"AWS_MAX_ATTEMPTS": "4"}) == {}
    kept = with_s3_retries({"config_kwargs": {"connect_timeout": 5}}, ["s3://b/"], environ={})
    assert kept["config_kwargs"]["connect_timeout"] == 5 and "retries" in kept["config_kwargs"]
