"""Manifest reading and row validation: bad rows are skipped with a reason, good rows kept."""

import json

import pyarrow.parquet as pq

from sea_ray.data.manifest import read_manifest, rows_to_table

GOOD = {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                       {"from": "gpt", "value": "a red circle"}]}


def _bad_rows():
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}
    return [
        GOOD,
        "not an object",
        {"image": "x.png", "conversations": GOOD["conversations"]},                      # missing id
        {"id": "b", "image": "b.png", "conversations": []},                               # empty conversations
        {"id": "c", "image": "c.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "d", "image": "d.png", "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": "  "}]},
        {"id": "e", "image": "e.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                        {"from": "gpt", "value": "x"}]},
        dict(GOOD),                                                                         # duplicate id
        text_only,
    ]


def test_json_manifest_keeps_good_rows_and_reports_each_bad_one(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_bad_rows()))
    result = read_manifest(str(path))
    assert [r["id"] for r in result.rows] == ["a", "t"]
    reasons = {e["row"]: e["reason"] for e in result.errors}
    assert set(reasons) == {1, 2, 3, 4, 5, 6, 7}
    assert "not an object" in reasons[1] and reasons[2] == "missing id"
    assert "empty" in reasons[3] and "should be from 'human'" in reasons[4]
    assert "empty answer" in reasons[5] and "0 <image> placeholders" in reasons[6]
    assert "duplicate id" in reasons[7]
    # a text-only sample is fine unless images are required
    assert [r["id"] for r in read_manifest(str(path), require_image=True).rows] == ["a"]


def test_jsonl_with_a_broken_line_and_parquet_roundtrip(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps(dict(GOOD, id="b")) + "\n")
    result = read_manifest(str(path))
    assert [r["id"] for r in result.rows] == ["a", "b"]
    assert result.errors[0]["row"] == 1 and "malformed JSON" in result.errors[0]["reason"]
    pq.write_table(rows_to_table(result.rows), tmp_path / "m.parquet")
    again = read_manifest(str(tmp_path / "m.parquet"))
    assert [r["id"] for r in again.rows] == ["a", "b"] and again.rows[0]["conversations"] == GOOD["conversations"]


def test_world_manifests_are_clean(world_dir):
    for name in ("pretrain.json", "instruct.json"):
        result = read_manifest(str(world_dir / "train" / name))
        assert result.errors == [] and len(result.rows) >= 48


def test_manifests_are_streamed_not_read_whole(tmp_path, monkeypatch):
    """JSON and JSON Lines are read as streams (a 1 GB mix665k is not held as text, nor as every
    parsed sample besides the rows kept); a line separator inside a JSONL string is not a line."""
    import gc

    from sea_ray import storage

    rows = [GOOD, dict(GOOD, id="b", conversations=[GOOD["conversations"][0],
                                                     {"from": "gpt", "value": "a red\u2028circle"}])]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")

    def whole(*args, **kwargs):
        raise AssertionError("the manifest was read whole")

    monkeypatch.setattr(storage, "read_text", whole)
    monkeypatch.setattr(storage, "read_bytes", whole)
    for name in ("m.json", "m.jsonl"):
        result = read_manifest(str(tmp_path / name))
        assert result.errors == [] and [r["id"] for r in result.rows] == ["a", "b"], name
        assert result.rows[1]["conversations"][1]["value"] == "a red\u2028circle"
    assert gc.isenabled()


def test_a_json_manifest_broken_anywhere_is_not_json(tmp_path):
    import gc

    import pytest

    text = json.dumps([GOOD, dict(GOOD, id="b")])
    cases = {"truncated": (text[:-20], "is not valid JSON after row 0"),
             "trailing": (text + " []", "is not valid JSON after row 1"),
             "empty": ("", "is not valid JSON ("),
             "an object": (json.dumps({"rows": [GOOD]}), "holds a JSON dict"),
             "a broken object": ('{"rows": [', "is not valid JSON (")}
    for name, (body, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(body)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            read_manifest(str(path))
        assert gc.isenabled(), name
