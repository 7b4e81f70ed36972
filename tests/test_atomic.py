"""Files are written whole or not at all: a write that fails half-way leaves the old file as it
was and no temporary file behind, for the helper and for every writer that uses it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from phpn.atomic import TEMP_SUFFIX, atomic_file, write_atomic


class DiskFull(OSError):
    pass


@pytest.fixture
def failing_fsync(monkeypatch):
    """Every write reaches the disk's cache, then flushing it fails (a full disk, a lost mount)."""
    def boom(fd):
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)


def _left(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_replaces_the_whole_file(tmp_path):
    target = tmp_path / "notes.json"
    assert write_atomic(target, "old") == target
    write_atomic(target, b"new \xff")
    assert target.read_bytes() == b"new \xff"
    write_atomic(target, "ünïcode")
    assert target.read_text(encoding="utf-8") == "ünïcode"
    assert _left(tmp_path) == ["notes.json"]


@pytest.mark.parametrize("stop", [ValueError("bad value"), KeyboardInterrupt()])
def test_a_write_that_stops_half_way_keeps_the_old_file_and_no_temporary(tmp_path, stop):
    target = tmp_path / "page.html"
    target.write_text("the old page")
    with pytest.raises(type(stop)):
        with atomic_file(target, "w") as fh:
            fh.write("half of the new p")
            aside = [n for n in _left(tmp_path) if n != "page.html"]
            assert len(aside) == 1 and aside[0].startswith(".page.html.")  # the new one, aside
            raise stop
    assert target.read_text() == "the old page"
    assert _left(tmp_path) == ["page.html"]


def test_a_failed_flush_keeps_the_old_file_and_no_temporary(tmp_path, failing_fsync):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull):
        write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert _left(tmp_path) == ["a.bin"]


def test_the_temporary_file_is_a_hidden_sibling(tmp_path):
    target = tmp_path / "x.png"
    with atomic_file(target) as fh:
        fh.write(b"png")
        (name,) = _left(tmp_path)
        assert name.startswith(".x.png.") and name.endswith(TEMP_SUFFIX)
    assert _left(tmp_path) == ["x.png"]
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_file(target, "a"):
            pass


def _explanation():
    from phpn.show.explanation import Explanation

    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0], maps[1, 2, 2] = 9.0, -4.5
    return Explanation(image=Image.new("RGB", (12, 12), (90, 90, 90)), class_index=0, class_name="zero", logit=1.5,
                       bias=1.0, contributions=maps.mean((1, 2)), maps=maps, top=[(0, "zero", 1.5, 0.8)])


def test_saving_an_explanation_fails_without_losing_the_old_file(tmp_path, monkeypatch):
    from phpn.errors import ConfigError

    for name in ("why.png", "why.html"):
        (tmp_path / name).write_text("the old one")
    with pytest.raises(ConfigError, match="does not know its run"):  # the page fails while being written
        _explanation().save(tmp_path / "why.html")
    _explanation().save(tmp_path / "new.png")
    assert Image.open(tmp_path / "new.png").size[0] > 100
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(DiskFull(28, "No space left on device")))
    with pytest.raises(DiskFull):
        _explanation().save(tmp_path / "why.png")
    assert (tmp_path / "why.png").read_text() == (tmp_path / "why.html").read_text() == "the old one"
    assert _left(tmp_path) == ["new.png", "why.html", "why.png"]


def test_saving_notes_fails_without_losing_the_old_notes(tmp_path, failing_fsync):
    from phpn.runs.annotations import Annotations, save_annotations
    from phpn.runs.store import ANNOTATIONS, META

    (tmp_path / META).write_text(json.dumps({"tensors_sha256": "ab" * 32}))
    (tmp_path / ANNOTATIONS).write_text("old notes")
    notes = Annotations(class_indices=(0,), k=2, run_sha256="ab" * 32)
    notes.set(0, 1, name="beak")
    with pytest.raises(DiskFull):
        save_annotations(notes, tmp_path)
    assert (tmp_path / ANNOTATIONS).read_text() == "old notes"
    assert _left(tmp_path) == sorted([ANNOTATIONS, META])


def test_discovery_progress_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from phpn.runs.resume import MANIFEST, GroupResult, ProgressStore

    store = ProgressStore(tmp_path / "progress", "key", resume=False)
    group = GroupResult(index=3, records=[{"class_index": 1}], prototypes=torch.ones(1, 2, 4, dtype=torch.float64),
                        nmf_prototypes=torch.ones(1, 2, 4), alpha=torch.ones(1, 2), pooled=torch.zeros(0, 4),
                        logits=torch.zeros(0, 5), labels=torch.zeros(0, dtype=torch.long))
    store.save(group)
    assert _left(store.path) == sorted([MANIFEST, "group-00003.json", "group-00003.safetensors"])
    assert torch.equal(store.finished()[3].prototypes, group.prototypes)

    def boom(fd):
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    group.index = 4
    with pytest.raises(DiskFull):
        store.save(group)
    assert _left(store.path) == sorted([MANIFEST, "group-00003.json", "group-00003.safetensors"])
    assert sorted(store.finished()) == [3]


def test_a_new_file_gets_the_usual_permissions_and_a_replaced_one_keeps_its_own(tmp_path):
    import os
    import stat

    from phpn.atomic import write_atomic

    old = os.umask(0o022)
    try:
        new = write_atomic(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's private 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        write_atomic(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(old)
