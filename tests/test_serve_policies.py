"""Policy validation and the copy-on-write PolicyStore (atomic files, snapshots, versions)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from safesteer.errors import SafesteerError
from safesteer.serve import Policy, PolicyStore
from safesteer.serve.policies import PolicyBody, valid_name


def test_policy_validation():
    p = Policy(
        name="kid-safe.v2",
        directions=["probe_harm"],
        alpha=4.0,
        alpha_min=0,
        alpha_max=8,
        condition={"probe": "harm", "threshold": 0.7},
        clamps=[{"atoms": [3, 1, 3], "lam": 2}],
    )
    assert p.clamps[0].atoms == [3, 1] and p.condition.threshold == 0.7 and p.positions == "all"
    assert Policy(name="x", directions=["a"], positions="prompt").positions == "prompt"
    bad = [
        dict(name="x"),  # neither directions nor clamps
        dict(name="x", directions=["a"], alpha=9, alpha_max=8),
        dict(name="x", directions=["a"], alpha_min=2, alpha_max=1, alpha=1.5),
        dict(name="x", directions=["a", "a"]),
        dict(name="x", directions=[""]),
        dict(name="x", directions=["a"], alpha=float("nan")),
        dict(name="x", directions=["a"], alpha=float("inf")),
        dict(name="x", directions=["a"], condition={"probe": "h", "threshold": 1.01}),
        dict(name="x", directions=["a"], condition={"probe": "h", "threshold": 0.5, "extra": 1}),
        dict(name="x", directions=["a"], layer=-1),
        dict(name="x", clamps=[{"atoms": []}]),
        dict(name="x", clamps=[{"atoms": [1], "mode": "melt"}]),
        dict(name="x", directions=["a"], typo=1),
        dict(name="x", directions=["a"], positions="answer"),
        dict(name="../etc", directions=["a"]),
        dict(name="", directions=["a"]),
        dict(name="a" * 65, directions=["a"]),
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            Policy(**kw)


def test_names_and_from_body():
    assert (
        valid_name("a")
        and valid_name("A-b_c.9")
        and not valid_name(".x")
        and not valid_name("a/b")
        and not valid_name("a b")
    )
    p = Policy.from_body("n1", PolicyBody(directions=["d"]))
    assert p.name == "n1"
    assert Policy.from_body("n1", {"name": "n1", "directions": ["d"]}).name == "n1"
    with pytest.raises(SafesteerError, match="path names 'n1'"):
        Policy.from_body("n1", {"name": "other", "directions": ["d"]})


def test_store_versions_and_snapshots():
    store = PolicyStore()
    r1, created = store.put(Policy(name="a", directions=["d"], alpha=1.0))
    assert created and r1.version == 1
    snap = store.get("a")
    r2, created = store.put(Policy(name="a", directions=["d"], alpha=2.0))
    assert not created and r2.version == 2
    # the snapshot taken before the swap is untouched; a new read sees the new policy
    assert snap.policy.alpha == 1.0 and snap.version == 1 and store.get("a").policy.alpha == 2.0
    mapping = store.snapshot()
    store.put(Policy(name="b", directions=["d"]))
    assert "b" not in mapping and "b" in store.snapshot()
    assert store.delete("a").version == 2 and store.get("a") is None and store.delete("a") is None
    assert store.version == 4 and store.swaps == 4 and store.names() == ["b"]


def test_store_files_are_atomic_and_reloadable(tmp_path):
    folder = tmp_path / "pol"
    store = PolicyStore(folder)
    store.put(Policy(name="a", directions=["d"], alpha=1.5, description="first"))
    store.put(Policy(name="b", clamps=[{"atoms": [1]}], layer=2))
    store.put(Policy(name="a", directions=["d"], alpha=2.5))
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json"]  # no temp files left
    raw = json.loads((folder / "a.json").read_text())
    assert raw["format"] == "safesteer-policy" and raw["version"] == 3 and raw["policy"]["alpha"] == 2.5
    again = PolicyStore(folder)
    assert (
        again.get("a").version == 3
        and again.get("a").policy.alpha == 2.5
        and again.get("b").policy.layer == 2
    )
    assert again.put(Policy(name="c", directions=["d"]))[0].version == 4
    # a hand-written plain policy file is accepted too; temp files of an interrupted write are ignored
    (folder / "plain.json").write_text(json.dumps({"directions": ["d"], "alpha": 1}))
    (folder / ".a.json.x.tmp").write_text("{garbage")
    assert PolicyStore(folder).get("plain").policy.alpha == 1.0


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"directions": []}', "not a valid policy"),
        ('{"name": "other", "directions": ["d"]}', "rename the file"),
        ("[1]", "not a policy file"),
    ],
)
def test_store_refuses_bad_files_naming_them(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(SafesteerError, match=match) as exc:
        PolicyStore(tmp_path)
    assert "bad.json" in str(exc.value)


def test_bind_refuses_unservable_policies(tmp_path):
    PolicyStore(tmp_path).put(Policy(name="a", directions=["missing"]))

    def compiler(p):
        raise SafesteerError(f"unknown direction '{p.directions[0]}'")

    with pytest.raises(SafesteerError, match=r"policy 'a' .*a\.json.*unknown direction 'missing'"):
        PolicyStore(tmp_path).bind(compiler)
    store = PolicyStore(tmp_path)
    store.bind(lambda p: ("compiled", p.name))
    assert store.get("a").runtime == ("compiled", "a")
    with pytest.raises(SafesteerError):
        store._compiler = compiler
        store.put(Policy(name="b", directions=["x"]))
    assert store.get("b") is None and not (tmp_path / "b.json").exists()


def test_concurrent_writers_and_readers(tmp_path):
    store = PolicyStore(tmp_path)
    store.put(Policy(name="p", directions=["d"], alpha=0.0, description="0"))
    errors = []

    def writer(w):
        for i in range(40):
            store.put(
                Policy(name="p", directions=["d"], alpha=float(w * 100 + i), description=str(w * 100 + i))
            )

    def reader():
        for _ in range(400):
            rec = store.get("p")
            # every snapshot is internally consistent: alpha and description were written together
            if str(int(rec.policy.alpha)) != rec.policy.description:
                errors.append(rec)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = store.get("p")
    assert final.version == 121 == store.version
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["version"] == final.version and saved["policy"]["alpha"] == final.policy.alpha


def test_store_compiles_its_initial_policies_and_keeps_file_versions_from_one(tmp_path):
    compiled = []

    def compiler(p):
        compiled.append(p.name)
        return ("runtime", p.name)

    p = Policy(name="a", directions=["harm"], alpha=1.0)
    store = PolicyStore(policies=[p], compiler=compiler)
    assert store.get("a").runtime == ("runtime", "a") and compiled == ["a"]
    # a policy file of version 1 loads as version 1 (versions count from 1)
    folder = tmp_path / "pol"
    writer = PolicyStore(folder)
    writer.put(p)
    assert json.loads((folder / "a.json").read_text())["version"] == 1
    writer.put(Policy(name="b", directions=["harm"], alpha=2.0))
    again = PolicyStore(folder)
    assert (again.get("a").version, again.get("b").version) == (1, 2)
    # the record's policy is listed without its name (the name is the record's)
    assert "name" not in writer.get("a").to_dict()["policy"]
    # a policy whose file another process already removed is still deleted
    (folder / "a.json").unlink()
    assert writer.delete("a") is not None and writer.get("a") is None


def test_validation_errors_read_as_one_line_with_pydantics_messages():
    from pydantic import BaseModel

    from safesteer.serve.policies import format_validation_error, policy_direction

    class M(BaseModel):
        a: int
        b: int
        c: int
        d: int = 0

    def err(**kw):
        with pytest.raises(ValidationError) as e:
            M(**kw)
        return format_validation_error(e.value)

    three = err(a="x", b="y", c="z")  # exactly `limit` errors: nothing "more"
    assert three.count("Input should be a valid integer") == 3 and "more" not in three
    assert err(a="x", b="y", c="z", d="w").endswith("(+1 more)")
    from safesteer.steering import Direction

    v = np.arange(1.0, 5.0)
    with pytest.raises(SafesteerError, match="sum of the policy's directions"):
        policy_direction(["u", "v"], [Direction("u", v, "custom", 1), Direction("v", -v, "custom", 1)], None)
