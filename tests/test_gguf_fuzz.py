"""GGUF fuzzing (so8t_jax/fuzz.py) in the fast suite: 300 seeded mutations of four tiny valid files (F32, Q8_0,
F32 with LongRoPE factors, Q6_K) give only a WeightsError naming the file or a correct load, each case within the
time and memory bounds; the outcome judge and the long-run runner catch what they are there to catch."""
import collections

import numpy as np
import pytest

import so8t_jax
from so8t_jax import fuzz
from so8t_jax.gguf_rules import Refused
from so8t_jax.weights.common import WeightsError

N_CASES = 300
# mutations of the tensor table or of the file's length: the seed's model itself (the field rewritten to its own
# value) or an error, never a different model
LAYOUT_MUTATIONS = ("offset", "ttype", "dim", "n_dims", "garbage_info", "truncate", "append", "splice")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return [fuzz.reference(f) for f in fuzz.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))]


@pytest.fixture(scope="module")
def outcomes(refs, tmp_path_factory):
    return list(fuzz.run_cases(refs, 0, N_CASES, seed=0, workdir=tmp_path_factory.mktemp("cases"), watchdog_s=120))


def test_only_named_errors_or_correct_loads(outcomes):
    failures = [o for o in outcomes if o["kind"] in fuzz.FAILURES]
    assert not failures, failures[:3]
    kinds = collections.Counter(o["kind"] for o in outcomes)
    assert set(kinds) <= {"error", "same", "changed"}, kinds
    # not vacuous: most mutations are refused, some load unchanged, some are different valid files
    assert kinds["error"] >= 0.7 * N_CASES and kinds["same"] >= 5 and kinds["changed"] >= 3, kinds
    assert all(o["seconds"] < fuzz.TIME_LIMIT_S and o["peak_bytes"] < fuzz.MEMORY_LIMIT_BYTES for o in outcomes)
    assert all(f"case{o['case']}.gguf: " in o["message"] for o in outcomes if o["kind"] == "error")
    assert len({o["mutation"].split(":")[0] for o in outcomes}) >= 15  # every kind of mutation ran


def test_layout_mutations_never_load_a_different_model(outcomes):
    single = [o for o in outcomes if " + " not in o["mutation"] and o["mutation"].split(":")[0] in LAYOUT_MUTATIONS]
    assert len(single) >= 80
    assert all(o["kind"] in ("error", "same") for o in single), [o for o in single if o["kind"] not in
                                                                 ("error", "same")][:3]


def test_nonfinite_values_are_refused_naming_the_tensor(outcomes):
    poisoned = [o for o in outcomes if o["mutation"].startswith("poison:") and " + " not in o["mutation"]]
    assert len(poisoned) >= 8
    for o in poisoned:
        tensor = o["mutation"].rsplit(" ", 1)[1]
        assert o["kind"] == "error" and "finite" in o["message"] and repr(tensor) in o["message"], o


def test_mutations_are_seeded(refs):
    data = refs[0].data
    a, b = (fuzz.mutate(data, np.random.default_rng([7, i])) for i in (3, 3))
    assert a == b and a[0] != data
    assert len({fuzz.mutate(data, np.random.default_rng([7, i]))[1] for i in range(20)}) > 10


def test_judge_flags_what_a_load_must_never_give(refs, tmp_path, monkeypatch):
    ref = next(r for r in refs if r.path.name.startswith("llama.F32"))
    path = tmp_path / "case.gguf"
    path.write_bytes(ref.data)
    assert fuzz.run_case(path, ref)["kind"] == "same"
    assert fuzz.run_case(path, ref, time_limit=0.0)["kind"] == "slow"
    assert fuzz.run_case(path, ref, memory_limit=1)["kind"] == "memory"
    poisoned = bytearray(ref.data)
    name, _, _, start, _, _ = next(t for t in fuzz.walk(ref.data).tensors if t[0] == "blk.0.ffn_up.weight")
    poisoned[start:start + 4] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(poisoned))
    assert fuzz.run_case(path, ref)["kind"] == "error"
    real_load = so8t_jax.load
    monkeypatch.setattr(fuzz.loading, "load", lambda p: real_load(p, allow_nonfinite=True))
    assert fuzz.run_case(path, ref)["kind"] == "nonfinite"
    path.write_bytes(ref.data)

    def refuse(data):
        raise Refused("as if llama.cpp refused it")
    with monkeypatch.context() as m:
        m.setattr(fuzz, "walk", refuse)
        assert fuzz.run_case(path, ref)["kind"] == "layout_refused"
    for exc, kind in ((KeyError("x"), "crash"), (WeightsError("elsewhere.gguf", "x"), "error_unnamed"),
                      (MemoryError(), "memory")):
        monkeypatch.setattr(fuzz.loading, "load", lambda p, exc=exc: (_ for _ in ()).throw(exc))
        assert fuzz.run_case(path, ref)["kind"] == kind


def test_changed_load_must_match_the_reference_tensor_table(refs, tmp_path, monkeypatch):
    ref = refs[0]
    lay = fuzz.walk(ref.data)
    changed = bytearray(ref.data)
    changed[lay.tensors[0][3]] ^= 1  # a data byte: a different valid file
    path = tmp_path / "case.gguf"
    path.write_bytes(bytes(changed))
    assert fuzz.run_case(path, ref)["kind"] == "changed"

    class Shifted(fuzz.GGUFFile):  # a loader that misread one tensor's start
        def __init__(self, p):
            super().__init__(p)
            name, (q, shape, start, n) = next(iter(self.tensors.items()))
            self.tensors[name] = (q, shape, start + 32, n)
    monkeypatch.setattr(fuzz, "GGUFFile", Shifted)
    assert fuzz.run_case(path, ref)["kind"] == "wrong"


def test_long_runs_count_hangs_and_dead_children(refs, tmp_path, monkeypatch):
    monkeypatch.setenv("SO8T_FUZZ_INJECT", "hang:2,die:5")
    rows: dict = {}
    fuzz._run_range([refs[0].path], 0, 0, 8, 100, tmp_path, 5.0, rows)
    assert sorted(rows) == list(range(8))
    assert rows[2]["kind"] == "hang" and rows[5]["kind"] == "died" and rows[5]["returncode"] < 0
    assert all(rows[i]["kind"] in ("error", "same", "changed") for i in (0, 1, 3, 4, 6, 7))
    summary = fuzz.summarize([rows[i] for i in range(8)], 0.0)
    assert summary["hangs"] == 1 and summary["crashes"] == 1 and len(summary["failures"]) == 2
