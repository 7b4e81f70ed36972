"""Uploaded files: zip extraction refuses traversal, links, bombs; names are sanitised."""
import io
import os
import stat
import zipfile

import pytest
from PIL import Image

from phpn.app.uploads import (
    extract_zip,
    find_image_root,
    open_uploaded_image,
    safe_filename,
    save_model_upload,
    save_upload,
    sniff_upload,
    unpack_uploaded_zip,
)
from phpn.errors import DataError


def _png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(tmp_path, entries, name="data.zip") -> str:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                zf.writestr(entry, b"target")
            else:
                zf.writestr(entry[0], entry[1])
    return str(path)


class _Upload(io.BytesIO):
    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name
        self.size = len(data)


def test_extracts_an_image_folder_and_steps_into_the_wrapping_folder(tmp_path):
    z = _zip(tmp_path, [("shirts/a/1.png", _png()), ("shirts/a/2.png", _png()), ("shirts/b/1.png", _png()),
                        ("__MACOSX/shirts/._a", b"junk")])
    root = extract_zip(z, tmp_path / "out")
    assert root == tmp_path / "out" / "shirts"
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    assert not (tmp_path / "out" / "__MACOSX").exists()


@pytest.mark.parametrize("bad", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                 "..\\evil.png"])
def test_refuses_entries_outside_the_folder(tmp_path, bad):
    z = _zip(tmp_path, [("a/1.png", _png()), (bad, b"x")])
    with pytest.raises(DataError, match="outside its folder"):
        extract_zip(z, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "evil.png").exists()


def test_refuses_symlinks(tmp_path):
    link = zipfile.ZipInfo("a/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = _zip(tmp_path, [("a/1.png", _png()), link])
    with pytest.raises(DataError, match="symbolic link"):
        extract_zip(z, tmp_path / "out")


def test_refuses_too_many_files(tmp_path):
    z = _zip(tmp_path, [(f"a/{i}.png", b"x") for i in range(6)])
    with pytest.raises(DataError, match="more than 5 files"):
        extract_zip(z, tmp_path / "out", max_files=5)


def test_refuses_a_size_bomb_by_declared_size(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.bmp", b"\0" * (4 << 20))  # 4 MB of zeros compress to a few KB
    assert path.stat().st_size < 64 << 10
    with pytest.raises(DataError, match="unpack to"):
        extract_zip(path, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refuses_a_size_bomb_whose_header_lies(tmp_path):
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/big.bin", b"\1" * (2 << 20))
    raw = bytearray(path.read_bytes())
    # Rewrite the declared uncompressed size (central directory) to 10 bytes.
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    lh = raw.find(b"PK\x03\x04")
    raw[lh + 22:lh + 26] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError):
        extract_zip(path, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_a_zip_is_a_clear_error(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        extract_zip(p, tmp_path / "out")


def test_upload_names_are_sanitised_and_types_checked(tmp_path):
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\Users\\me\\model weights.pt") == "model_weights.pt"
    assert safe_filename("...") == "upload"
    folder = tmp_path / "upload"
    path = save_upload(_Upload(b"abc", "../../model.pt"), folder, suffixes=(".pt",))
    assert path.parent == folder and path.read_bytes() == b"abc"
    with pytest.raises(DataError, match="unexpected file type"):
        save_upload(_Upload(b"abc", "model.exe"), folder, suffixes=(".pt",))
    with pytest.raises(DataError, match="more than"):
        save_upload(_Upload(b"abcdef", "model.pt"), folder, max_bytes=3)


def test_uploaded_images_are_checked_before_decoding():
    img = open_uploaded_image(_Upload(_png(size=(10, 6)), "ok.png"))
    assert img.size == (10, 6) and img.mode == "RGB"
    with pytest.raises(DataError, match="too large"):
        open_uploaded_image(_Upload(_png(size=(200, 200)), "big.png"), max_pixels=1000)
    with pytest.raises(DataError, match="not a readable image"):
        open_uploaded_image(_Upload(b"GIF89a broken", "broken.gif"))


def test_a_real_decompression_bomb_is_refused():
    # A 20000 x 20000 grey PNG: small on disk, 400 megapixels once decoded.
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    w = h = 20000
    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    comp = zlib.compressobj()
    row = b"\0" * (w + 1)
    data = b"".join(comp.compress(row) for _ in range(200)) + comp.flush()
    bomb = header + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    with pytest.raises(DataError, match="too large"):
        open_uploaded_image(_Upload(bomb, "bomb.png"))


def test_find_image_root_stops_at_the_class_folders(tmp_path):
    (tmp_path / "wrap" / "inner" / "cats").mkdir(parents=True)
    (tmp_path / "wrap" / "inner" / "dogs").mkdir(parents=True)
    assert find_image_root(tmp_path / "wrap") == tmp_path / "wrap" / "inner"
    (tmp_path / "flat" / "cats").mkdir(parents=True)
    assert find_image_root(tmp_path / "flat") == tmp_path / "flat"


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"fc.weight": torch.zeros(2, 3)})


@pytest.mark.parametrize("name", ["model.pt", "model.th", "model.tar", "model.ckpt", "model", "weights.bin"])
@pytest.mark.parametrize("kind", ["torch-zip", "pickle", "safetensors"])
def test_checkpoints_are_recognised_by_content_whatever_their_name(tmp_path, name, kind):
    import torch

    data = {"torch-zip": lambda: _torch_bytes({"w": torch.ones(2)}),
            "pickle": lambda: _torch_bytes({"w": torch.ones(2)}, legacy=True),
            "safetensors": _safetensors_bytes}[kind]()
    saved = save_model_upload(_Upload(data, name), tmp_path)
    assert saved.kind == "checkpoint" and saved.name == name
    assert saved.path.name == name and sniff_upload(saved.path) == kind and saved.path.read_bytes() == data


@pytest.mark.parametrize("data, looks_like", [
    (_png(), "it looks like a PNG image"),
    (b"\xff\xd8\xff\xe0 jpeg", "it looks like a JPEG image"),
    (b"<!DOCTYPE html><html>", "it looks like a web page (HTML)"),
    (b"epoch,loss\n1,0.5\n", "it looks like a text file"),
    (b"\x93NUMPY\x01\x00", "it looks like a NumPy array file"),
    (b"\x00\x01\x02\x03garbage", "it looks like a file of unknown type"),
])
def test_files_that_are_not_checkpoints_are_refused_and_deleted(tmp_path, data, looks_like):
    with pytest.raises(DataError) as err:
        save_model_upload(_Upload(data, "weights.th"), tmp_path)
    assert str(err.value).startswith(f"'weights.th' is not a checkpoint: {looks_like}.")
    assert "any file name or extension will do" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_zip_of_images_is_not_taken_for_a_checkpoint(tmp_path):
    z = _zip(tmp_path, [("a/1.png", _png())])
    with pytest.raises(DataError, match="it is a zip archive of other files"):
        sniff_upload(z)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        sniff_upload(empty)


def test_an_uploaded_zip_is_unpacked_and_the_archive_deleted(tmp_path):
    with open(_zip(tmp_path, [("shirts/a/1.png", _png()), ("shirts/b/1.png", _png())]), "rb") as fh:
        good = _Upload(fh.read(), "shirts.zip")
    folder = tmp_path / "upload-1"
    folder.mkdir()
    root = unpack_uploaded_zip(good, folder)
    assert root == folder / "images" / "shirts" and sorted(os.listdir(folder)) == ["images"]


@pytest.mark.parametrize("entries, limit, phrase", [
    ([("a/1.png", _png()), ("../evil.png", b"x")], 1 << 20, "outside its folder"),
    ([("a/zeros.bmp", b"\0" * (1 << 20))], 64 << 10, "more than the"),
])
def test_a_refused_zip_leaves_nothing_behind(tmp_path, entries, limit, phrase):
    path = tmp_path / "src" / "x.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    folder = tmp_path / "upload-1"
    folder.mkdir()
    with pytest.raises(DataError, match=phrase):
        unpack_uploaded_zip(_Upload(path.read_bytes(), "x.zip"), folder, max_bytes=limit)
    assert not folder.exists()
