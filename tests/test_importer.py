"""``sea-ray import-manifest``: LLaVA JSON -> validated Parquet shards, locally and on S3."""

import json

import pyarrow.parquet as pq
import pytest

from sea_ray import storage
from sea_ray.cli import main
from sea_ray.data.importer import ERRORS_FILE, import_manifest
from sea_ray.data.manifest import read_manifest
from sea_ray.labels.schema import ERRORS_SCHEMA


def _seeded(world_dir, tmp_path):
    """The world's train instruct manifest plus seeded bad rows; returns (path, good rows, bad ids)."""
    rows = json.loads((world_dir / "train" / "instruct.json").read_text())
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    conv = rows[0]["conversations"]
    bad = [
        {"id": "bad_missing_image", "image": "no_such_file.png", "conversations": conv},   # decode error
        {"id": "bad_corrupt_image", "image": str(tmp_path / "junk.png"), "conversations": conv},  # decode error
        {"id": "bad_no_placeholder", "image": rows[0]["image"],
         "conversations": [{"from": "human", "value": "Describe."}, conv[1]]},             # manifest error
        {"image": rows[0]["image"], "conversations": conv},                                # missing id
        dict(rows[1]),                                                                      # duplicate id
    ]
    mixed = rows[:5] + bad[:2] + rows[5:20] + bad[2:] + rows[20:]
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(mixed))
    return path, rows, bad


def _errors(output):
    fs, path = storage.pyarrow_fs(output)
    table = pq.read_table(f"{path}/{ERRORS_FILE}", filesystem=fs)
    assert table.schema.equals(ERRORS_SCHEMA)
    return table.to_pylist()


def test_import_local_embeds_images_and_reports_bad_rows(world_dir, tmp_path):
    src, rows, bad = _seeded(world_dir, tmp_path)
    out = tmp_path / "manifest"
    summary = import_manifest(str(src), str(out), image_root=str(world_dir / "images"), embed_images=True,
                              rows_per_shard=16, max_error_fraction=0.5)  # 5 bad rows of 55 seeded
    assert summary["rows_written"] == len(rows) and summary["rows_skipped"] == len(bad)
    assert summary["rows_read"] == len(rows) + len(bad)
    assert summary["shards"] == len(list(out.glob("shard-*.parquet"))) > 1
    assert (out / "_SUCCESS").exists() and json.loads((out / "_SUCCESS").read_text())["rows_written"] == len(rows)

    back = read_manifest(str(out))
    assert back.errors == []
    assert [r["id"] for r in back.rows] == [r["id"] for r in rows]
    for got, want in zip(back.rows, rows):
        assert got["conversations"] == want["conversations"] and got["image"] == want.get("image")
        if want.get("image"):
            assert got["image_bytes"] == (world_dir / "images" / want["image"]).read_bytes()
        else:
            assert got["image_bytes"] is None
    assert summary["images_embedded"] == sum(1 for r in rows if r.get("image"))
    assert summary["text_only_rows"] == sum(1 for r in rows if not r.get("image")) > 0

    errors = {e["image_id"]: e for e in _errors(str(out))}
    assert len(_errors(str(out))) == len(bad)
    # the labels job's reasons: storage.read_many's and decode_image's
    assert errors["bad_missing_image"]["stage"] == "decode" and "missing file" in errors["bad_missing_image"]["reason"]
    assert errors["bad_corrupt_image"]["stage"] == "decode" and "not an image" in errors["bad_corrupt_image"]["reason"]
    assert errors["bad_no_placeholder"]["stage"] == "manifest"
    assert errors[None]["reason"] == "missing id"
    assert "duplicate id" in errors[rows[1]["id"]]["reason"]
    assert errors["bad_missing_image"]["row"] == 5

    # re-importing into the same folder replaces the earlier shards (no stale rows)
    again = import_manifest(str(src), str(out), rows_per_shard=1000, max_error_fraction=0.5)
    assert again["shards"] == 1 == len(list(out.glob("shard-*.parquet")))
    assert again["rows_skipped"] == 3  # without embedding, image files are not read
    assert len(read_manifest(str(out)).rows) == len(rows) + 2


def test_import_to_s3_and_read_back(world_dir, tmp_path, s3_bucket):
    src, rows, bad = _seeded(world_dir, tmp_path)
    out = f"{s3_bucket}/manifests/instruct"
    summary = import_manifest(str(src), out, image_root=str(world_dir / "images"), embed_images=True,
                              rows_per_shard=20, require_image=True, max_error_fraction=0.5)
    image_rows = [r for r in rows if r.get("image")]
    text_rows = [r for r in rows if not r.get("image")]
    assert summary["rows_written"] == len(image_rows)
    assert summary["rows_skipped"] == len(bad) + len(text_rows)
    assert storage.is_complete(out)
    back = read_manifest(out, require_image=True)
    assert [r["id"] for r in back.rows] == [r["id"] for r in image_rows]
    assert back.rows[3]["image_bytes"] == (world_dir / "images" / image_rows[3]["image"]).read_bytes()
    reasons = [e["reason"] for e in _errors(out)]
    assert sum(r == "no image" for r in reasons) == len(text_rows)


def test_cli_import_manifest(world_dir, tmp_path, capsys):
    out = tmp_path / "pretrain"
    code = main(["import-manifest", "--input", str(world_dir / "train" / "pretrain.json"), "--output", str(out),
                 "--image-root", str(world_dir / "images")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_written"] == len(read_manifest(str(out)).rows) == 48 and summary["rows_skipped"] == 0
    assert main(["import-manifest", "--input", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x")]) == 1


def test_cli_embed_images_makes_bad_images_error_rows(world_dir, tmp_path, capsys):
    """--embed-images decodes as the labels job does (decode_image): a decompression bomb, a
    truncated JPEG and a zero-byte file each become one error row; the import neither crashes nor
    embeds an image the labels job would refuse."""
    from tests.test_images import bad_and_awkward_images, png_bomb

    rows = json.loads((world_dir / "train" / "pretrain.json").read_text())
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "bomb.png").write_bytes(png_bomb(20000, 20000))  # 400 Mpx, ~50 KB on disk
    (bad_dir / "truncated.jpg").write_bytes(bad_and_awkward_images()["truncated_jpeg"])
    (bad_dir / "empty.jpg").write_bytes(b"")
    conv = rows[0]["conversations"]
    bad = {"bad_bomb": ("bomb.png", "decompression bomb"), "bad_truncated": ("truncated.jpg", "truncated"),
           "bad_empty": ("empty.jpg", "empty file")}
    mixed = rows[:3] + [{"id": k, "image": str(bad_dir / f), "conversations": conv} for k, (f, _) in bad.items()]
    mixed += rows[3:]
    src = tmp_path / "pretrain.json"
    src.write_text(json.dumps(mixed))

    out = tmp_path / "embedded"
    code = main(["import-manifest", "--input", str(src), "--output", str(out), "--image-root",
                 str(world_dir / "images"), "--embed-images", "--rows-per-shard", "20", "--max-error-fraction", "0.1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_read"] == len(rows) + 3
    assert summary["rows_written"] == summary["images_embedded"] == len(rows) and summary["rows_skipped"] == 3
    errors = _errors(str(out))
    assert len(errors) == 3
    assert {e["image_id"]: e["row"] for e in errors} == {"bad_bomb": 3, "bad_truncated": 4, "bad_empty": 5}
    for e in errors:
        assert e["stage"] == "decode" and bad[e["image_id"]][1] in e["reason"], e
    back = read_manifest(str(out), require_image=True)
    assert back.errors == [] and [r["id"] for r in back.rows] == [r["id"] for r in rows]
    for got, want in zip(back.rows, rows):
        assert got["image_bytes"] == (world_dir / "images" / want["image"]).read_bytes()


@pytest.mark.parametrize("bad", ["{not json", '{"a": 1}', '[{"id": "a"}, {"id": "b", "conversations": [{'])
def test_unreadable_manifest_is_a_data_error(tmp_path, bad):
    from sea_ray.errors import DataError

    (tmp_path / "m.json").write_text(bad)
    with pytest.raises(DataError):
        import_manifest(str(tmp_path / "m.json"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "_SUCCESS").exists()  # a manifest broken after its first rows: nothing imported
