"""sea_ray.storage, the one I/O layer: image references, batch reads, atomic writes, exclusive creates."""

import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sea_ray import storage

# --------------------------------------------------------------------------- resolve_image


@pytest.mark.parametrize("root", [None, "/datasets/images", "file:///datasets/images", "s3://bucket/images"])
def test_uris_and_absolute_paths_are_kept_whatever_the_root(root):
    assert storage.resolve_image("/archive/a.png", root) == "/archive/a.png"
    assert storage.resolve_image("s3://other/b.jpg", root) == "s3://other/b.jpg"
    assert storage.resolve_image("gs://other/b.jpg", root) == "gs://other/b.jpg"
    assert storage.resolve_image("https://host/c.jpg", root) == "https://host/c.jpg"
    assert storage.resolve_image("file:///archive/a.png", root) == "/archive/a.png"  # its local path
    assert storage.resolve_image(None, root) is None
    assert storage.resolve_image("", root) is None


def test_relative_paths_go_under_the_root(tmp_path, monkeypatch):
    assert storage.resolve_image("x/a.png", "/datasets/images") == "/datasets/images/x/a.png"
    assert storage.resolve_image("x/a.png", "/datasets/images/") == "/datasets/images/x/a.png"
    assert storage.resolve_image("x/a.png", "file:///datasets/images") == "/datasets/images/x/a.png"
    assert storage.resolve_image("x/a.png", "s3://bucket/images") == "s3://bucket/images/x/a.png"
    assert storage.resolve_image("x/a.png", "s3://bucket/images/") == "s3://bucket/images/x/a.png"
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_image("x/a.png", None) == str(tmp_path / "x" / "a.png")  # the working dir
    assert storage.resolve_image("x/a.png", "imgs") == str(tmp_path / "imgs" / "x" / "a.png")


def test_labels_and_training_read_the_same_file_for_an_absolute_path(tmp_path):
    """The bug this resolver fixed: with image_root=/datasets/images, training read an absolute
    manifest path /archive/a.png from /datasets/images/archive/a.png while the labels job read
    /archive/a.png. A decoy sits at the wrong place; both jobs must see the real image."""
    from sea_ray.data.images import decode_image
    from sea_ray.labels.job import _input_blocks
    from sea_ray.train.data import _load_image

    root = tmp_path / "datasets" / "images"
    real = tmp_path / "archive" / "a.png"
    decoy = root / str(real).lstrip("/")  # where joining the root to any path would look
    rel = root / "rel" / "b.png"
    for path, colour in ((real, (200, 10, 10)), (decoy, (10, 200, 10)), (rel, (10, 10, 200))):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), colour).save(path)

    for ref, want in ((str(real), real), (f"file://{real}", real), ("rel/b.png", rel)):
        for image_root in (str(root), f"file://{root}"):
            rows = [{"row": 0, "id": "a", "image": ref, "image_bytes": None}]
            plan = SimpleNamespace(shards=[rows], image_root=image_root)
            uri = _input_blocks(plan, [0], 8)[0].column("uri").to_pylist()[0]
            assert uri == str(want)
            labels_img, _ = decode_image(storage.read_many([uri])[0][0])
            train_img, reason = _load_image(ref, None, image_root)
            assert reason is None
            assert np.array_equal(np.asarray(labels_img), np.asarray(train_img))
            assert np.array_equal(np.asarray(train_img), np.asarray(Image.open(want).convert("RGB")))

    img, reason = _load_image("rel/missing.png", None, str(root))  # a reason, not an exception
    assert img is None and "missing file" in reason


# --------------------------------------------------------------------------- read_many


def test_read_many_gives_bytes_or_a_reason_in_order(tmp_path, s3_bucket):
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub").mkdir()
    storage.write_bytes(f"{s3_bucket}/b.bin", b"b")
    uris = [str(tmp_path / "a.bin"), None, str(tmp_path / "missing.bin"), f"{s3_bucket}/b.bin",
            f"{s3_bucket}/missing.bin", str(tmp_path / "sub"), f"file://{tmp_path / 'a.bin'}"]
    for threads in (1, 4):
        got = storage.read_many(uris, threads=threads)
        assert [d for d, _ in got] == [b"a", None, None, b"b", None, None, b"a"]
        assert got[1][1] == "no image"
        assert got[2][1].startswith("missing file:") and got[4][1].startswith("missing file:")
        assert got[5][1].startswith("cannot read")
    assert storage.read_many([f"{s3_bucket}/b.bin"]) == [(b"b", None)]  # a single remote path


# --------------------------------------------------------------------------- atomic write, exclusive create


def test_atomic_write_is_whole_or_absent(tmp_path):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"one")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"one"  # the old content, untouched
    assert os.listdir(target.parent) == ["f.bin"]  # no temporary left behind
    with storage.open_atomic(f"file://{target}") as f:
        f.write(b"two")
    assert target.read_bytes() == b"two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() makes it, not 0600


def test_atomic_write_to_s3(s3_bucket):
    uri = f"{s3_bucket}/x/f.bin"
    with pytest.raises(RuntimeError):
        with storage.open_atomic(uri) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    with storage.open_atomic(uri) as f:
        f.write(b"whole")
    assert storage.read_bytes(uri) == b"whole"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive(tmp_path, where, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(base, "locks", "LOCK")
    assert storage.create_exclusive(uri, b"first") is True
    assert storage.create_exclusive(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"
