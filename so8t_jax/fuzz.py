"""GGUF fuzzing: seeded mutations of small valid GGUF files and what loading each gives; shared by
tests/test_gguf_fuzz.py (a few hundred cases in the fast suite) and `scripts/bench.py fuzz` (long runs, each
batch of cases in a child process, so that a crash or a hang is caught, counted, and the run goes on).

    mutate(data, rng) -> (bytes, description)   one mutation (one time in eight, three) of a valid file
    run_case(path, reference) -> outcome dict   load the file once and judge the result

Outcome kinds. Fine: `error` (a WeightsError naming the file), `same` (loaded; every parameter bitwise the seed
file's), `changed` (loaded; parameters differ, but the file is valid by llama.cpp's rules and the loader read its
tensor table as gguf_rules.walk does: a different valid file, e.g. data bytes changed or two same-shape tensors
renamed). Failures (FAILURES): `error_unnamed`, `crash` (any other exception), `slow` / `memory` (over the time /
traced-memory bound), `nonfinite` (a loaded parameter is NaN or inf), `layout_refused` (loaded, but llama.cpp's
reader refuses the file), `wrong` (loaded, but the tensor table disagrees with walk's); in long runs also `hang`
(a child silent past its deadline) and `died` (a child killed, e.g. by a segfault).
"""
from __future__ import annotations

import collections
import dataclasses
import faulthandler
import json
import os
import pathlib
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import traceback

import gguf
import jax
import numpy as np

from so8t_jax import loading
from so8t_jax.gguf_rules import Layout, Refused, walk
from so8t_jax.weights.common import WeightsError
from so8t_jax.weights.gguf import GGUFFile

TIME_LIMIT_S = 5.0                  # per case (a typical one takes 5-50 ms)
MEMORY_LIMIT_BYTES = 256 * 2 ** 20  # traced (numpy and Python) peak per case
FAILURES = ("error_unnamed", "crash", "slow", "memory", "nonfinite", "layout_refused", "wrong", "hang", "died")
_EXTREMES = (0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1)
# where the float16 scale `d` sits in a block, for the types whose blocks `poison` breaks
_SCALE_AT = {"Q8_0": 0, "Q4_0": 0, "Q4_1": 0, "Q5_0": 0, "Q5_1": 0, "Q4_K": 0, "Q5_K": 0, "Q6_K": 208}


# ------------------------------------------------------------------------------------------------ mutations

def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _set(buf: bytearray, field, new: int, what: str) -> str:
    """Write integer `new` (wrapped to the field's width) into field (offset, size, label, group)."""
    off, size, label, _ = field
    old = int.from_bytes(buf[off:off + size], "little")
    new %= 1 << 8 * size
    buf[off:off + size] = new.to_bytes(size, "little")
    return f"{what}: {label} {old} -> {new}"


def _old(buf, field) -> int:
    return int.from_bytes(buf[field[0]:field[0] + field[1]], "little")


def _extreme(buf, lay: Layout, rng):
    f = _pick(rng, lay.fields)
    old = _old(buf, f)
    return _set(buf, f, _pick(rng, _EXTREMES + (old + 1, old - 1, old * 2, old // 2)), "extreme")


def _count(buf, lay, rng):
    """A metadata count, size or id (block_count, head_count, ...) bit-flipped or set to an extreme."""
    f = _pick(rng, [f for f in lay.fields if f[3] == "value" and re.search(r"count|length|_id|align|window", f[2])])
    new = _old(buf, f) ^ (1 << int(rng.integers(8 * f[1]))) if rng.random() < 0.5 else _pick(rng, _EXTREMES)
    return _set(buf, f, new, "count")


def _bitflip(buf, lay, rng, data=False):
    lo, hi = (lay.data_start, len(buf)) if data else (0, lay.data_start)
    at = sorted(int(x) for x in rng.integers(lo, hi, int(rng.integers(1, 4))))
    for a in at:
        buf[a] ^= 1 << int(rng.integers(8))
    return f"bitflip{'_data' if data else ''}: bits of bytes {at}"


def _poison(buf, lay, rng):
    """A NaN or inf written where one of a tensor's values (F32, F16, BF16) or block scales is."""
    name, ttype, _, start, n_bytes, _ = _pick(rng, lay.tensors)
    q = gguf.GGMLQuantizationType(ttype)
    bad16, bad32 = _pick(rng, (0x7C00, 0xFC00, 0x7E00)), _pick(rng, (0x7F800000, 0xFF800000, 0x7FC00000))
    width, value, at = {"F32": (4, bad32, 0), "F16": (2, bad16, 0), "BF16": (2, bad32 >> 16, 0)}.get(
        q.name, (gguf.GGML_QUANT_SIZES[q][1], bad16, _SCALE_AT.get(q.name)))
    if at is None:
        return _bitflip(buf, lay, rng, data=True)
    off = start + width * int(rng.integers(n_bytes // width)) + at
    buf[off:off + (4 if q.name == "F32" else 2)] = value.to_bytes(4 if q.name == "F32" else 2, "little")
    return f"poison: a non-finite value in {q.name} tensor {name}"


def _truncate(buf, lay, rng):
    r = rng.random()
    cut = int(rng.integers(0, lay.data_start)) if r < 0.4 else len(buf) - int(rng.integers(1, 65)) if r < 0.7 \
        else int(rng.integers(0, len(buf)))
    del buf[cut:]
    return f"truncate: at byte {cut}"


def _append(buf, lay, rng):
    n = int(rng.integers(1, 65))
    buf += bytes(n) if rng.random() < 0.5 else rng.bytes(n)
    return f"append: {n} bytes"


def _swap(buf, lay, rng):
    pool = [f for f in lay.fields if f[3] == _pick(rng, ("offset", "ttype", "dim", "value", "header", "length"))]
    a, b = _pick(rng, pool), _pick(rng, pool)
    if a[1] != b[1] or a == b:
        return _extreme(buf, lay, rng)
    va, vb = bytes(buf[a[0]:a[0] + a[1]]), bytes(buf[b[0]:b[0] + b[1]])
    buf[a[0]:a[0] + a[1]], buf[b[0]:b[0] + b[1]] = vb, va
    return f"swap: {a[2]} <-> {b[2]}"


def _tensor_field(buf, lay, rng, group):
    """A tensor's offset, type, one dim or n_dims changed to a nearby, borrowed or wild value."""
    name, _, _, _, n_bytes, _ = _pick(rng, lay.tensors)
    f = _pick(rng, [x for x in lay.fields if x[2].startswith(name + " ") and x[3] == group])
    old = _old(buf, f)
    new = {"offset": lambda: _pick(rng, (old + _pick(rng, (1, 32, n_bytes, -1, -32, -n_bytes)),
                                         _old(buf, _pick(rng, [x for x in lay.fields if x[3] == "offset"])),
                                         int(rng.integers(0, len(buf))))),
           "ttype": lambda: _pick(rng, [t.value for t in gguf.GGMLQuantizationType] + [int(rng.integers(64)), 2 ** 31]),
           "dim": lambda: _pick(rng, (old * 2, old // 2, old + 1, old - 1, 0, old + 32, old + 256)),
           "n_dims": lambda: _pick(rng, (old + 1, old - 1, 0, 5))}[group]()
    return _set(buf, f, new, group)


def _garbage_info(buf, lay, rng):
    """Random bytes over one tensor info (its name kept seven times in ten)."""
    k = int(rng.integers(len(lay.tensors)))
    info_at = lay.tensors[k][5]
    end = lay.tensors[k + 1][5] if k + 1 < len(lay.tensors) else lay.data_start
    lo = info_at if rng.random() < 0.3 else info_at + 8 + len(lay.tensors[k][0].encode())
    buf[lo:end] = rng.bytes(end - lo)
    return f"garbage_info: {lay.tensors[k][0]} bytes {lo}..{end}"


def _rename(buf, lay, rng, duplicate=True):
    """A tensor name (or a metadata key) overwritten by another of the same length (a duplicate), or two swapped."""
    pool = [s for s in lay.strings if s[2] == ("key" if rng.random() < 0.3 else "tensor name")]
    a = _pick(rng, pool)
    same = [s for s in pool if s[1] == a[1] and s != a]
    if not same:
        return _extreme(buf, lay, rng)
    b = _pick(rng, same)
    va, vb = bytes(buf[a[0]:a[0] + a[1]]), bytes(buf[b[0]:b[0] + b[1]])
    buf[a[0]:a[0] + a[1]] = vb
    if not duplicate:
        buf[b[0]:b[0] + b[1]] = va
    what = "duplicate" if duplicate else "swap_names"
    return f"{what}: {va.decode(errors='replace')} / {vb.decode(errors='replace')}"


def _string(buf, lay, rng):
    off, n, label = _pick(rng, [s for s in lay.strings if s[1]])
    at = off + int(rng.integers(n))
    buf[at] = int(rng.integers(32, 127))
    return f"string: byte {at - off} of a {label} -> {chr(buf[at])!r}"


def _splice(buf, lay, rng):
    at, n = int(rng.integers(0, lay.data_start)), int(rng.integers(1, 17))
    if rng.random() < 0.5:
        buf[at:at] = rng.bytes(n)
        return f"splice: {n} bytes inserted at {at}"
    del buf[at:at + n]
    return f"splice: {n} bytes deleted at {at}"


# (function, keeps every byte where it was: may be followed by another mutation)
MUTATIONS = ((_extreme, True), (_count, True), (_bitflip, True), (lambda b, lay, r: _bitflip(b, lay, r, True), True),
             (_poison, True), (_truncate, False), (_append, False), (_swap, True), (_garbage_info, True),
             *((lambda b, lay, r, g=g: _tensor_field(b, lay, r, g), True)
               for g in ("offset", "ttype", "dim", "n_dims")),
             (_rename, True), (lambda b, lay, r: _rename(b, lay, r, duplicate=False), True), (_string, True),
             (_splice, False))
_LAYOUTS: dict[bytes, Layout] = {}


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One mutation of the valid GGUF file `data` (three in a row one time in eight), and what was done."""
    if data not in _LAYOUTS:
        if len(_LAYOUTS) > 8:
            _LAYOUTS.clear()
        _LAYOUTS[data] = walk(data)
    lay, buf, done = _LAYOUTS[data], bytearray(data), []
    steps = 3 if rng.random() < 0.125 else 1
    for step in range(steps):
        fn, stackable = _pick(rng, MUTATIONS)
        while step < steps - 1 and not stackable:
            fn, stackable = _pick(rng, MUTATIONS)
        done.append(fn(buf, lay, rng))
    return bytes(buf), " + ".join(done)


# ------------------------------------------------------------------------------------------------ one case

@dataclasses.dataclass
class Reference:
    """A seed file, its bytes and its params as loaded unmutated."""
    path: pathlib.Path
    data: bytes
    params: dict


def reference(path) -> Reference:
    return Reference(pathlib.Path(path), pathlib.Path(path).read_bytes(), _flat(loading.load(path).params))


def _flat(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def error_kind(problem: str) -> str:
    """A WeightsError's problem with quoted names, bracketed values and numbers blanked: the kind of error."""
    return re.sub(r"\d+", "N", re.sub(r"b?'[^']*'|b?\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)", "_", problem))[:90]


def _judge(path: pathlib.Path, params: dict, ref: Reference) -> dict:
    for name, v in params.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return {"kind": "nonfinite", "message": name}
    try:
        lay = walk(path.read_bytes())
    except Refused as e:
        return {"kind": "layout_refused", "message": str(e)}
    if params.keys() == ref.params.keys() and all(np.array_equal(v, ref.params[k]) for k, v in params.items()):
        return {"kind": "same"}
    ours = {n: (t[0].value, tuple(reversed(t[1])), t[2], t[3]) for n, t in GGUFFile(path).tensors.items()}
    theirs = {t[0]: t[1:5] for t in lay.tensors}
    return {"kind": "changed"} if ours == theirs else {"kind": "wrong", "message": "the tensor tables differ"}


def run_case(path, ref: Reference, time_limit: float = TIME_LIMIT_S, memory_limit: int = MEMORY_LIMIT_BYTES) -> dict:
    """Load `path` (a mutation of ref's file) once, judge the result; the load's time and traced memory peak."""
    path, params = pathlib.Path(path), None
    tracemalloc.start()
    start = time.perf_counter()
    try:
        params, out = _flat(loading.load(path).params), {}
    except WeightsError as e:
        out = {"kind": "error" if str(path) in str(e) else "error_unnamed", "error": error_kind(e.problem),
               "message": str(e)[:300]}
    except MemoryError:
        out = {"kind": "memory", "message": "MemoryError"}
    except Exception as e:  # noqa: BLE001 - every other exception is what the fuzzer looks for
        out = {"kind": "crash", "error": type(e).__name__, "message": "".join(traceback.format_exception(e))[-800:]}
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if params is not None:
        out = _judge(path, params, ref)
    out.update(seconds=round(seconds, 4), peak_bytes=peak)
    if seconds > time_limit:
        out.update(kind="slow", was=out["kind"])
    if peak > memory_limit:
        out.update(kind="memory", was=out["kind"])
    return out


def run_cases(refs: list[Reference], start: int, count: int, seed: int, workdir, watchdog_s: float = 0.0):
    """Cases start .. start+count-1 in this process, one outcome dict each. Case i mutates refs[i % len(refs)]
    with the generator of (seed, i), so any case can be rerun alone. watchdog_s > 0: a case that runs that long
    ends the process with a traceback (faulthandler) rather than hang it."""
    for i in range(start, start + count):
        ref = refs[i % len(refs)]
        data, what = mutate(ref.data, np.random.default_rng([seed, i]))
        path = pathlib.Path(workdir) / f"case{i}.gguf"
        path.write_bytes(data)
        if watchdog_s:
            faulthandler.dump_traceback_later(watchdog_s, exit=True)
        try:
            out = run_case(path, ref)
        finally:
            faulthandler.cancel_dump_traceback_later()
            path.unlink()
        yield {"case": i, "file": ref.path.name, "mutation": what, **out}


def build_seeds(out_dir) -> list[pathlib.Path]:
    """The seed files, tiny models from tests/fixtures.py (needs torch and transformers): llama F32, qwen2 Q8_0
    (q/k/v biases), phi3 F32 with LongRoPE factor tensors, llama Q6_K (256-wide rows)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from fixtures import KQUANT_OVERRIDES, make_hf_model, write_gguf
    out = pathlib.Path(out_dir)
    plan = (("llama", "F32", {}), ("qwen2", "Q8_0", {}), ("phi3_longrope", "F32", {}),
            ("llama", "Q6_K", KQUANT_OVERRIDES))
    return [write_gguf(make_hf_model(fam, out / f"{fam}-{q}", **kw), out / f"{fam}.{q}.gguf", q)
            for fam, q, kw in plan]


# ------------------------------------------------------------------------------------------------ long runs

def _run_range(files, seed: int, start: int, stop: int, batch: int, workdir, hang_s: float, rows: dict) -> None:
    """Cases [start, stop) in child processes of at most `batch` cases: a child silent for hang_s once ready (its
    seed files loaded: up to 300 s) is killed and its case counted as a hang, a child that dies counts its case as
    died; a new child goes on from the next case."""
    i = start
    while i < stop:
        log, end = pathlib.Path(workdir) / f"child{i}.log", min(i + batch, stop)
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "so8t_jax.fuzz", str(seed), str(i), str(end - i),
                                     str(workdir), *map(str, files)],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda out=proc.stdout, q=lines: ([q.put(x) for x in out], q.put(None)),
                         daemon=True).start()
        ready = False
        while True:
            try:
                line = lines.get(timeout=hang_s if ready else max(hang_s, 300.0))
            except queue.Empty:
                proc.kill()
                line = {"case": i, "kind": "hang", "seconds": hang_s, "message": log.read_text()[-800:]}
            if line is None:  # the child ended: after its last case, or it died on case i
                if proc.wait() != 0 and i < end:
                    rows[i] = {"case": i, "kind": "died", "returncode": proc.returncode,
                               "message": log.read_text()[-800:]}
                    i += 1
                break
            ready = ready or line == '{"ready": true}\n'
            row = line if isinstance(line, dict) else json.loads(line) if line.startswith('{"case"') else None
            if row is not None:
                rows[row["case"]], i = row, row["case"] + 1
            if row is not None and row["kind"] == "hang":
                break
        proc.kill()
        proc.wait()


def summarize(rows: list[dict], wall_s: float) -> dict:
    """The figures of a run: outcomes, errors by kind, failures by category, time per case."""
    kinds, by_mutation = collections.Counter(r["kind"] for r in rows), collections.defaultdict(collections.Counter)
    for r in rows:
        for m in r.get("mutation", "?").split(" + "):
            by_mutation[m.split(":")[0]][r["kind"]] += 1
    seconds = np.array([r.get("seconds", 0.0) for r in rows] or [0.0])
    errors = collections.Counter(r["error"] for r in rows if r["kind"] == "error")
    return {"cases": len(rows), "outcomes": dict(kinds.most_common()), "errors_by_kind": dict(errors.most_common(30)),
            "correct_loads": kinds["same"] + kinds["changed"], "crashes": kinds["crash"] + kinds["died"],
            "hangs": kinds["hang"] + kinds["slow"], "memory_blowups": kinds["memory"],
            "nonfinite_loads": kinds["nonfinite"], "loads_llama_cpp_refuses": kinds["layout_refused"],
            "wrong_loads": kinds["wrong"], "errors_not_naming_the_file": kinds["error_unnamed"],
            "seconds_per_case": {"mean": round(float(seconds.mean()), 4), "max": round(float(seconds.max()), 4),
                                 "p99": round(float(np.quantile(seconds, 0.99)), 4)},
            "peak_traced_bytes_max": max((r.get("peak_bytes", 0) for r in rows), default=0),
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())}, "wall_s": round(wall_s, 1),
            "failures": [r for r in rows if r["kind"] in FAILURES][:20]}


def bench(cases: int, seed: int = 0, files=None, jobs: int = 2, batch: int = 1000, hang_s: float = 120.0) -> dict:
    """Cases 0 .. cases-1 split over `jobs` runners (threads, each driving child processes), then summarize."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = [pathlib.Path(f) for f in files] if files else build_seeds(pathlib.Path(tmp) / "seeds")
        rows: dict[int, dict] = {}
        edges = np.linspace(0, cases, jobs + 1).astype(int)
        threads = [threading.Thread(target=_run_range, args=(files, seed, a, b, batch, tmp, hang_s, rows))
                   for a, b in zip(edges[:-1], edges[1:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"bench": "fuzz", "seed": seed, "files": [f.name for f in files], "jobs": jobs,
            **summarize([rows[i] for i in sorted(rows)], time.perf_counter() - start)}


def _child(seed: str, start: str, count: str, workdir: str, *files: str) -> None:
    """`python -m so8t_jax.fuzz SEED START COUNT WORKDIR FILE...`: those cases, one JSON line each. For the
    tests of the runner, SO8T_FUZZ_INJECT="hang:I,die:J" makes case I hang and the child abort at case J."""
    refs, inject = [reference(f) for f in files], dict(
        reversed(x.split(":")) for x in os.environ.get("SO8T_FUZZ_INJECT", "").split(",") if x)
    print('{"ready": true}', flush=True)
    for i in range(int(start), int(start) + int(count)):
        if inject.get(str(i)) == "hang":
            time.sleep(3600)
        if inject.get(str(i)) == "die":
            os.abort()
        print(json.dumps(next(run_cases(refs, i, 1, int(seed), workdir))), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:])
