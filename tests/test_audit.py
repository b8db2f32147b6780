"""Audit log: each row's hash against hashlib on the documented canonical form, every kind of tampering named
by verify, the script's exit codes and output, non-JSON-native payloads, tree_digest, a non-SQLite file."""
import hashlib
import json
import os
import pathlib
import sqlite3
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from so8t_jax import audit

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = (audit.RUN_START, audit.CHECKPOINT, audit.EVAL, audit.CHECKPOINT, audit.RUN_END)


def make_log(run_dir):
    with audit.AuditLog(run_dir) as log:  # a run dir: the log is run_dir/audit.sqlite
        for i, kind in enumerate(KINDS, 1):
            log.append(kind, step=i * 10, note=f"event {i}", loss=0.5 / i)
    return run_dir / audit.FILENAME


def sql(db, *statements):
    conn = sqlite3.connect(db)
    with conn:
        for s in statements:
            conn.execute(s)
    conn.close()


@pytest.fixture
def db(tmp_path):
    return make_log(tmp_path)


def test_row_hashes_match_an_independent_recomputation(db):
    rows = sqlite3.connect(db).execute("SELECT seq, time, kind, payload, prev_hash, hash FROM events ORDER BY seq")
    prev = "0" * 64
    for n, (seq, time, kind, payload, prev_hash, stored) in enumerate(rows, 1):
        body = json.dumps({"seq": seq, "time": time, "kind": kind, "payload": json.loads(payload)},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert (seq, kind, prev_hash) == (n, KINDS[n - 1], prev)
        assert stored == hashlib.sha256((prev + body).encode("utf-8")).hexdigest()
        assert time.endswith("+00:00")
        prev = stored
    assert sqlite3.connect(db).execute("SELECT count, hash FROM head").fetchone() == (len(KINDS), prev)
    assert audit.verify(db) == audit.VerifyResult(True, len(KINDS), [])


@pytest.mark.parametrize("tamper, named", [
    ("UPDATE events SET payload = '{\"loss\":0.01,\"note\":\"event 3\",\"step\":30}' WHERE seq = 3", "seq 3 (eval)"),
    ("UPDATE events SET kind = 'anomaly' WHERE seq = 2", "seq 2 (anomaly)"),
    ("DELETE FROM events WHERE seq = 3", "seq 3 missing"),
    ("DELETE FROM events WHERE seq = 5", "seq 5 missing"),
    ("UPDATE events SET time = '2020-01-01T00:00:00+00:00' WHERE seq = 5", "seq 5 (run_end)"),
])
def test_tampering_is_named(db, tamper, named):
    sql(db, tamper)
    result = audit.verify(db)
    assert not result.ok and any(named in p for p in result.problems), result.problems


def test_reordered_rows_are_named(db):
    sql(db, "UPDATE events SET seq = -1 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
        "UPDATE events SET seq = 3 WHERE seq = -1")
    problems = audit.verify(db).problems
    assert any("seq 2 (eval) is chained after seq 3" in p and "reordered" in p for p in problems), problems
    assert any("seq 3 (checkpoint) is chained after seq 1" in p for p in problems), problems


def test_forged_rows_are_detected(db):
    # A forger who knows the scheme: a valid link appended after the last row, but the head is not updated.
    seq, prev = sqlite3.connect(db).execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    time, payload = "2030-01-01T00:00:00+00:00", {"step": 999}
    h = audit.row_hash(prev, seq + 1, time, "export", payload)
    sql(db, f"INSERT INTO events VALUES ({seq + 1}, '{time}', 'export', '{audit.canonical(payload)}', '{prev}', '{h}')")
    problems = audit.verify(db).problems
    assert problems and "seq 6" in problems[0] and "added outside AuditLog" in problems[0], problems
    # A row slipped in before the first one breaks the first row's link.
    sql(db, f"INSERT INTO events VALUES (0, '{time}', 'eval', '{{}}', '{'0' * 64}', '{'1' * 64}')")
    problems = audit.verify(db).problems
    assert any("seq 0 (eval)" in p for p in problems) and any("seq 1 (run_start)" in p for p in problems), problems


def test_a_cut_tail_stays_visible_after_more_appends(db):
    sql(db, "DELETE FROM events WHERE seq = 5")
    with audit.AuditLog(db) as log:
        log.append(audit.RUN_START, resumed=True)
    problems = audit.verify(db).problems
    assert any("seq 5 missing" in p for p in problems), problems


def test_script_verify_and_show(tmp_path):
    good, bad = make_log(tmp_path / "good"), make_log(tmp_path / "bad")
    sql(bad, "UPDATE events SET kind = 'export' WHERE seq = 4")
    script = [sys.executable, str(ROOT / "scripts" / "audit.py")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(script + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for args in (["verify", str(good.parent)], ["verify", str(bad)],
                          ["show", str(good.parent), "--kind", "checkpoint", "--limit", "1", "--json"])]
    (ok, _), (fail, _), (shown, err) = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 1, 0], err
    assert ok.strip() == "OK: 5 events, chain intact"
    assert "seq 4 (export)" in fail and "FAILED" in fail
    [event] = [json.loads(line) for line in shown.splitlines()]
    assert (event["seq"], event["kind"], event["payload"]["step"]) == (4, "checkpoint", 40)


def test_non_json_native_payloads_round_trip(tmp_path):
    with audit.AuditLog(tmp_path / "a.sqlite") as log:
        log.append("x", f32=np.float32(0.25), i64=np.int64(7), arr=jnp.arange(3.0), bf=jnp.ones((2,), jnp.bfloat16),
                   flags=np.array([True, False]), nan=float("nan"), pinf=np.float32("inf"), ninf=-np.inf,
                   path=pathlib.Path("/tmp/x"), nested={1: (np.float64(1.5), None)})
    [event] = audit.show(tmp_path / "a.sqlite")
    assert event["payload"] == {"f32": 0.25, "i64": 7, "arr": [0.0, 1.0, 2.0], "bf": [1.0, 1.0],
                                "flags": [True, False], "nan": "nan", "pinf": "inf", "ninf": "-inf", "path": "/tmp/x",
                                "nested": {"1": [1.5, None]}}
    assert audit.verify(tmp_path / "a.sqlite").ok
    with pytest.raises(TypeError, match="object"):
        audit.AuditLog(tmp_path / "b.sqlite").append("x", bad=object())


def test_show_filters(db):
    assert [e["seq"] for e in audit.show(db)] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in audit.show(db, kind=audit.CHECKPOINT)] == [2, 4]
    assert [e["seq"] for e in audit.show(db, limit=2)] == [4, 5]


def test_tree_digest():
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [jnp.zeros(3), jnp.ones((), jnp.bfloat16)]}
    d = audit.tree_digest(tree)
    assert d == audit.tree_digest(tree) and len(d) == 64
    changed = {**tree, "w": tree["w"].copy()}
    changed["w"][1, 2] = 5.5
    assert audit.tree_digest(changed) != d
    assert audit.tree_digest({**tree, "w": tree["w"].reshape(3, 2)}) != d  # same bytes, other shape
    assert audit.tree_digest({**tree, "w": tree["w"].astype(np.int32).view(np.float32)}) != d


def test_helpers(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"teacher" * 1000)
    assert audit.file_sha256(tmp_path / "f.bin", chunk=100) == hashlib.sha256(b"teacher" * 1000).hexdigest()
    versions = audit.package_versions(("numpy", "no-such-package-xyz"))
    assert versions == {"numpy": np.__version__, "no-such-package-xyz": None}


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    for call in (audit.AuditLog, audit.verify, audit.show):
        with pytest.raises(audit.AuditError, match="junk.sqlite.*not an SQLite"):
            call(junk)
    other = tmp_path / "other.sqlite"
    sql(other, "CREATE TABLE events (seq INTEGER PRIMARY KEY, what TEXT)")
    with pytest.raises(audit.AuditError, match="other.sqlite.*not an so8t_jax audit log"):
        audit.AuditLog(other)
    with pytest.raises(audit.AuditError, match="missing.sqlite.*no such audit log"):
        audit.verify(tmp_path / "missing.sqlite")
