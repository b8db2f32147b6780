"""Hash-chained, append-only SQLite audit log of a training run (stdlib only at import time).

Row N stores hash = sha256(prev_hash + canonical JSON of {"seq", "time", "kind", "payload"}), prev_hash being
row N-1's hash (64 zeros for the first). Canonical JSON: sort_keys, separators (",", ":"), ensure_ascii=False,
UTF-8. A chain alone catches a changed, removed, inserted or reordered row but not a cut tail, so a one-row
table `head` holds the latest hash and count, written in the same transaction as each row. No secret is
involved: this catches accidents and naive edits, not someone who rewrites the whole chain and head.

One writer at a time: an AuditLog holds an exclusive flock on `audit.sqlite.lock` while it is open, so a
second process appending to the same run gets an AuditError instead of forking the chain; the kernel drops
the lock when its process dies, so a killed run never blocks its resume. Readers (verify, show) take no lock.
verify also reports a damaged file (truncated, or pages overwritten) as a problem naming it.
"""
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import socket
import sqlite3
import warnings
from pathlib import Path

FILENAME = "audit.sqlite"  # inside a run directory
_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database (its file format's header)
GENESIS = "0" * 64
RUN_START, CHECKPOINT, ANOMALY, ROLLBACK, EVAL, EXPORT, RUN_END = (
    "run_start", "checkpoint", "anomaly", "rollback", "eval", "export", "run_end")
KINDS = (RUN_START, CHECKPOINT, ANOMALY, ROLLBACK, EVAL, EXPORT, RUN_END)
_SCHEMA = {"events": [("seq", "INTEGER"), ("time", "TEXT"), ("kind", "TEXT"), ("payload", "TEXT"),
                      ("prev_hash", "TEXT"), ("hash", "TEXT")],
           "head": [("id", "INTEGER"), ("count", "INTEGER"), ("hash", "TEXT")]}
_CREATE = """
CREATE TABLE events (seq INTEGER PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
                     prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE head (id INTEGER PRIMARY KEY CHECK (id = 0), count INTEGER NOT NULL, hash TEXT NOT NULL);
"""


class AuditError(ValueError):
    """The file is missing, not SQLite, or not an audit log of this schema; or another process is writing it."""


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    n_events: int
    problems: list


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def row_hash(prev_hash: str, seq: int, time: str, kind: str, payload) -> str:
    body = canonical({"seq": seq, "time": time, "kind": kind, "payload": payload})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def jsonable(x):
    """numpy/jax scalars and arrays -> numbers and lists, paths -> str, NaN/inf -> "nan"/"inf"/"-inf"."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf" if x > 0 else "-inf")
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "items"):  # dicts, mappings, ConfigDicts
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((jsonable(v) for v in x), key=canonical)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist"):  # numpy and jax arrays and scalars
        y = x.tolist()
        return jsonable(y) if type(y) is not type(x) else jsonable(float(x))  # ml_dtypes scalars return themselves
    raise TypeError(f"audit payload value of type {type(x).__name__} is not JSON-serialisable: {x!r}")


def db_path(run_dir_or_db) -> Path:
    """A directory, or a path without a suffix that does not exist yet, is a run dir holding audit.sqlite."""
    p = Path(run_dir_or_db)
    return p / FILENAME if p.is_dir() or (not p.exists() and not p.suffix) else p


def _connect(path, create: bool) -> sqlite3.Connection:
    path = db_path(path)
    if not create and not path.is_file():
        raise AuditError(f"{path}: no such audit log")
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
    try:
        conn.execute("PRAGMA synchronous = FULL")  # default rollback journal: a crash leaves the whole row or none
        tables = {name: conn.execute("SELECT name, upper(type) FROM pragma_table_info(?)", (name,)).fetchall()
                  for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and create:
            conn.executescript(f"BEGIN; {_CREATE} COMMIT;")
        elif tables != _SCHEMA:
            raise AuditError(f"{path}: not an so8t_jax audit log (tables {tables}, expected {_SCHEMA})")
    except AuditError:
        conn.close()
        raise
    except sqlite3.DatabaseError as e:
        conn.close()
        raise AuditError(f"{path}: not an SQLite audit log ({e})") from e
    return conn


def _writer_lock(db: Path):
    """The open lock file of the log's only writer (flock, not SQLite's own locks: those last one transaction).
    A file object, not a bare fd, so that a log garbage-collected unclosed still lets go of the lock."""
    lock = open(db.with_name(db.name + ".lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(200).strip() or "unknown (it is starting)"
        lock.close()
        mine = " (this process)" if holder.split(" ")[0] == str(os.getpid()) else ""
        raise AuditError(f"audit log {db} is already open for writing by pid {holder}{mine}: another run is writing "
                         "to this run directory (wait for it to end, or use another run_name / output_dir)") from None
    except OSError as e:  # a file system without flock (some network mounts): run, but say so
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            lock.close()
            raise
        warnings.warn(f"{db}: cannot lock the audit log ({e}); nothing stops a second writer on this file system",
                      stacklevel=3)
    lock.truncate(0)
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


class AuditLog:
    """Append-only event log; `append(kind, **payload) -> hash`. Use as a context manager or call close().
    The only writer of its file while open: a second AuditLog on it, in any process, is an AuditError."""

    def __init__(self, path):
        self.path = db_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _writer_lock(self.path)
        try:
            self._conn = _connect(self.path, create=True)
        except BaseException:
            self._lock.close()
            raise

    def append(self, kind: str, **payload) -> str:
        payload = jsonable(payload)
        time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # the write lock is taken before reading the tail: no two rows share a seq
        try:
            # Continue from the head, not the table's last row: a cut tail then stays visible after more appends.
            last_seq, last_hash = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone() \
                or (0, GENESIS)
            count, prev = conn.execute("SELECT count, hash FROM head WHERE id = 0").fetchone() or (last_seq, last_hash)
            seq = max(count, last_seq) + 1
            h = row_hash(prev, seq, time, kind, payload)
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", (seq, time, kind, canonical(payload), prev, h))
            conn.execute("INSERT OR REPLACE INTO head VALUES (0, ?, ?)", (count + 1, h))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return h

    def close(self):
        self._conn.close()
        self._lock.close()  # closing the file drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _rows(path):
    conn = _connect(path, create=False)
    try:
        rows = conn.execute("SELECT seq, time, kind, payload, prev_hash, hash FROM events ORDER BY seq").fetchall()
        head = conn.execute("SELECT count, hash FROM head WHERE id = 0").fetchone()
    except sqlite3.DatabaseError as e:
        raise AuditError(f"{db_path(path)}: the audit log is damaged ({e}); scripts/audit.py verify says more") from e
    finally:
        conn.close()
    return rows, head


def _damage(path: Path) -> list:
    """Why the file is not a whole SQLite database ([] if it is); an AuditError if it is no SQLite file at all."""
    if not path.is_file():
        raise AuditError(f"{path}: no such audit log")
    with open(path, "rb") as f:
        header = f.read(100)
    if not (header.startswith(_MAGIC) or _MAGIC.startswith(header)):
        raise AuditError(f"{path}: not an SQLite audit log (no SQLite header: some other file, or its first page "
                         "was overwritten)")
    if len(header) < 100:
        return [f"{path}: truncated: {len(header)} bytes, shorter than an SQLite header (100 bytes)"]
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        try:  # a read transaction: a hot journal (a crash inside an append) is rolled back first, and no writer
            conn.execute("BEGIN")  # commits while the file is looked at below
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            unreadable = None
        except sqlite3.DatabaseError as e:
            unreadable = str(e)
        with open(path, "rb") as f:
            header = f.read(100)
        page = int.from_bytes(header[16:18], "big")
        page = 65536 if page == 1 else page
        pages, size = int.from_bytes(header[28:32], "big"), path.stat().st_size
        if header[24:28] == header[92:96] and pages * page > size:  # the in-header page count is current
            return [f"{path}: truncated: {size} bytes, but its header records {pages} pages of {page} bytes "
                    f"({pages * page} bytes)"]
        if page < 512 or size % page:
            return [f"{path}: damaged: {size} bytes is not a whole number of {page}-byte pages (truncated?)"]
        try:
            bad = [unreadable] if unreadable else [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
        except sqlite3.DatabaseError as e:
            bad = [str(e)]
    finally:
        conn.close()
    return [] if bad == ["ok"] else [f"{path}: damaged: SQLite's integrity check says: " + "; ".join(bad)]


def verify(path) -> VerifyResult:
    """Recompute the chain of RUN_DIR/audit.sqlite (or a .sqlite file) and compare with the head; a damaged
    file (truncated, pages overwritten) is a problem naming it, with the chain checked as far as it reads."""
    damage = _damage(db_path(path))
    try:
        rows, head = _rows(path)
    except AuditError as e:
        if not damage:
            raise
        return VerifyResult(False, 0, damage + ([f"its events cannot be read ({e.__cause__})"] if e.__cause__ else []))
    problems, seq_of_hash = list(damage), {r[5]: r[0] for r in rows}
    prev, prev_seq = GENESIS, 0
    for seq, time, kind, text, prev_hash, stored in rows:
        what = f"seq {seq} ({kind})"
        try:
            payload = json.loads(text)
            if canonical(payload) != text:
                problems.append(f"{what}: payload is not in canonical form (row edited)")
            if row_hash(prev_hash, seq, time, kind, payload) != stored:
                problems.append(f"{what}: stored hash does not match its contents (row changed)")
        except ValueError:
            problems.append(f"{what}: payload is not valid JSON (row changed)")
        if seq != prev_seq + 1:
            missing = f"seq {prev_seq + 1}" + (f"..{seq - 1}" if seq - 1 > prev_seq + 1 else "")
            problems.append(f"{missing} missing before {what}: row(s) removed" if seq > prev_seq + 1
                            else f"{what}: unexpected seq (expected seq {prev_seq + 1})")
        elif prev_hash != prev:
            if prev_hash in seq_of_hash:
                problems.append(f"{what} is chained after seq {seq_of_hash[prev_hash]}, not seq {prev_seq}: "
                                "rows reordered")
            else:
                problems.append(f"{what}: prev_hash does not match the hash of seq {prev_seq}: a row was removed, "
                                "inserted or replaced before it")
        prev, prev_seq = stored, seq
    n, (count, head_hash) = len(rows), head or (0, GENESIS)
    if head is None and n:
        problems.append(f"the head row is missing but the table has {n} events")
    elif count > n and count > prev_seq:
        cut = f"seq {prev_seq + 1}" + (f"..{count}" if count > prev_seq + 1 else "")
        problems.append(f"{cut} missing: last row(s) removed (head records {count} events, table has {n})")
    elif count < n:
        extra = "".join(f" seq {r[0]}" for r in rows if r[0] > count)
        problems.append(f"head records {count} events but the table has {n}: row(s) added outside AuditLog"
                        + (f" (beyond the head:{extra})" if extra else ""))
    elif count != n:
        problems.append(f"head records {count} events but the table has {n}: row(s) removed")
    elif n and head_hash != prev:
        problems.append(f"seq {prev_seq} ({rows[-1][2]}): hash differs from the head's: last row replaced")
    return VerifyResult(not problems, n, problems)


def show(path, kind=None, limit=None) -> list:
    """Events (payload parsed) in seq order, optionally of one kind; limit keeps the latest `limit` of them."""
    rows, _ = _rows(path)
    events = [dict(seq=s, time=t, kind=k, payload=_parse(p), prev_hash=ph, hash=h)
              for s, t, k, p, ph, h in rows if kind is None or k == kind]
    return events if limit is None else events[max(0, len(events) - limit):]


def _parse(text):
    try:
        return json.loads(text)
    except ValueError:  # a damaged row is still shown, as its raw text
        return text


def file_sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(names=("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "gguf", "numpy",
                            "so8t_jax")) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def tree_digest(tree) -> str:
    """sha256 over each leaf's path, dtype, shape and bytes, in tree_flatten order (sorted dict keys). Arrays
    spread over several processes are gathered: with several hosts every process must call this."""
    import jax
    import numpy as np

    from so8t_jax.distributed import host

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(host(leaf))
        h.update(canonical([jax.tree_util.keystr(path), str(a.dtype), list(a.shape), a.nbytes]).encode())
        h.update(a.tobytes())
    return h.hexdigest()
