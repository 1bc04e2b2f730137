"""Shard commit records: folded into a manifest exactly once, filtered by identity, order-independent
bytes."""

from __future__ import annotations

import json

from safesteer.store import commits


def _entry(i: int) -> dict:
    return {
        "index": i,
        "rows": 10 + i,
        "files": {"H": f"shard-{i:05d}.npy"},
        "sha256": {"H": f"h{i}"},
        "plan_sha256": f"p{i}",
        "truncated": i,
    }


def _manifest() -> dict:
    return {"shards": [], "labels": [], "datasets": {}, "precision": None}


def test_records_fold_into_the_manifest_in_index_order(tmp_path):
    ident = {"model": "m", "seed": 0}
    for i, ds in ((2, [("b", 3), ("a", 7)]), (0, [("a", 10)]), (1, [("b", 11)])):
        commits.write_commit(
            tmp_path,
            _entry(i),
            labels=[f"l{i}"],
            datasets=ds,
            precision="fp32",
            bf16_min_cosine=None,
            identity=ident,
        )
    commits.write_commit(
        tmp_path,
        _entry(3),
        labels=["x"],
        datasets=[("z", 1)],
        precision="bf16",
        bf16_min_cosine=0.9,
        identity={"model": "other", "seed": 0},
    )  # another run's record: ignored
    recs = commits.read_commits(tmp_path, ident)
    assert sorted(recs) == [0, 1, 2]
    m = _manifest()
    m["shards"] = [dict(_entry(1), sha256={"H": "stale"})]  # a record replaces an older entry of its shard
    commits.apply_commits(m, recs)
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["shards"][1]["sha256"] == {"H": "h1"}
    assert m["labels"] == ["l0", "l1", "l2"] and m["precision"] == "fp32"
    assert m["datasets"] == {"a": {"0": 10, "2": 7}, "b": {"1": 11, "2": 3}}
    # the same counts reached in another order serialise to the same bytes once canonical
    other = {"b": {"2": 3, "1": 11}, "a": {"2": 7, "0": 10}}
    assert json.dumps(commits.canonical_datasets(other)) == json.dumps(
        commits.canonical_datasets(m["datasets"])
    )
    commits.clear_commits(tmp_path)
    assert not list(tmp_path.glob(".shard-*"))


def test_an_unreadable_record_only_means_recomputing(tmp_path):
    commits.commit_path(tmp_path, 4).write_text("{not json")
    assert commits.read_commits(tmp_path, {}) == {}
