"""Audit log: each row's hash against hashlib on the documented canonical form, every kind of tampering named
by verify, the script's exit codes and output, non-JSON-native payloads, tree_digest, a non-SQLite file."""
import errno
import hashlib
import json
import os
import pathlib
import re
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


# ------------------------------------------------------------------------------------------------ one writer

WRITER = """
import sys
from so8t_jax import audit
with audit.AuditLog(sys.argv[1]) as log:
    log.append("run_start", writer="first")
    print("open", flush=True)
    for line in sys.stdin:  # one event per line read, until stdin closes
        log.append("checkpoint", step=int(line))
        print("appended", flush=True)
"""


def _writer(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "open\n", proc.stderr.read()
    return proc


def _append(proc, step):
    proc.stdin.write(f"{step}\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "appended\n"


def test_a_second_writer_is_refused_and_the_chain_stays_whole(tmp_path):
    first = _writer(tmp_path)
    try:
        _append(first, 1)
        refused = f"audit log {tmp_path / audit.FILENAME} is already open for writing by pid {first.pid} on "
        with pytest.raises(audit.AuditError, match=re.escape(refused)):  # this process
            audit.AuditLog(tmp_path)
        second = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, input="7\n",
                                capture_output=True, text=True, timeout=60)  # another process
        assert second.returncode == 1 and refused in second.stderr and "open" not in second.stdout
        _append(first, 2)
        assert audit.verify(tmp_path) == audit.VerifyResult(True, 3, [])  # readers take no lock
    finally:
        first.stdin.close()
        assert first.wait(timeout=60) == 0
    assert [(e["kind"], e["payload"]) for e in audit.show(tmp_path)] == [
        ("run_start", {"writer": "first"}), ("checkpoint", {"step": 1}), ("checkpoint", {"step": 2})]
    with audit.AuditLog(tmp_path) as log:  # the first writer closed: the log is free again
        log.append(audit.RUN_END, status="finished")
        with pytest.raises(audit.AuditError, match=f"by pid {os.getpid()} on .* \\(this process\\)"):
            audit.AuditLog(tmp_path)
    assert audit.verify(tmp_path) == audit.VerifyResult(True, 4, [])


def test_a_killed_writer_does_not_block_the_next_one(tmp_path):
    first = _writer(tmp_path)
    _append(first, 1)
    first.kill()  # SIGKILL: no close, the lock file and its pid stay behind
    first.wait(timeout=60)
    assert (tmp_path / "audit.sqlite.lock").read_text().startswith(f"{first.pid} ")
    with audit.AuditLog(tmp_path) as log:
        log.append("resume", step=1)
    assert audit.verify(tmp_path) == audit.VerifyResult(True, 3, [])
    assert [e["kind"] for e in audit.show(tmp_path)] == ["run_start", "checkpoint", "resume"]


def test_a_file_system_without_flock_warns_and_still_logs(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(audit.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock the audit log .*No locks available"):
        log = audit.AuditLog(tmp_path)
    log.append(audit.RUN_START)
    log.close()
    assert audit.verify(tmp_path) == audit.VerifyResult(True, 1, [])
    monkeypatch.setattr(audit.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # any other failure is not hidden
        audit.AuditLog(tmp_path)


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    """An audit log of several 4 KiB pages, and its bytes."""
    run_dir = tmp_path_factory.mktemp("big")
    with audit.AuditLog(run_dir) as log:
        for i in range(80):
            log.append(audit.CHECKPOINT, step=i, digest="ab" * 32, note="x" * 500)
    db = run_dir / audit.FILENAME
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    assert page == 4096 and db.stat().st_size >= 12 * page
    return db.read_bytes()


@pytest.mark.parametrize("cut", [0, 10, 99, 100, 1000, 4096, 3 * 4096 + 7, -4096, -1])
def test_verify_reports_a_truncated_file(big_log, tmp_path, cut):
    db = tmp_path / "audit.sqlite"
    db.write_bytes(big_log[:cut])
    result = audit.verify(db)
    size = len(big_log[:cut])
    want = (f"{db}: truncated: {size} bytes, shorter than an SQLite header (100 bytes)" if size < 100 else
            f"{db}: truncated: {size} bytes, but its header records {len(big_log) // 4096} pages of 4096 bytes "
            f"({len(big_log)} bytes)")
    assert not result.ok and result.problems[0] == want, result.problems


@pytest.mark.parametrize("page", [2, 3, 6, -1])
def test_verify_reports_an_overwritten_page(big_log, tmp_path, page):
    db, n = tmp_path / "audit.sqlite", len(big_log) // 4096
    page = page % (n + 1)
    db.write_bytes(big_log[:(page - 1) * 4096] + bytes(4096) + big_log[page * 4096:])
    result = audit.verify(db)
    assert not result.ok and result.problems[0].startswith(f"{db}: damaged: SQLite's integrity check says: ")
    with pytest.raises(audit.AuditError, match=f"{db}: the audit log is damaged"):
        audit.show(db)


def test_a_zeroed_first_page_and_the_script_on_a_damaged_file(big_log, tmp_path):
    db = tmp_path / "audit.sqlite"
    db.write_bytes(bytes(4096) + big_log[4096:])
    with pytest.raises(audit.AuditError, match="not an SQLite audit log .no SQLite header: some other file, or its "
                                               "first page was overwritten"):
        audit.verify(db)
    script = [sys.executable, str(ROOT / "scripts" / "audit.py"), "verify", str(db)]
    zeroed = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=60)
    db.write_bytes(big_log[:5000])
    cut = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert zeroed.returncode == 2 and zeroed.stderr.startswith(f"error: {db}: not an SQLite audit log")
    assert cut.returncode == 1 and cut.stdout.startswith(f"{db}: truncated: 5000 bytes")
    assert cut.stdout.splitlines()[-1].startswith("FAILED: 0 events")
