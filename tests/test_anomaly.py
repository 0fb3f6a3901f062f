"""The shipped anomaly model: integrity, int8 vs float, accuracy on fresh frames, real frames, bad input.

Everything runs the real model file with the real interpreter (ai-edge-litert)
and the real ONNX runtime; no mocks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge import find_peaks, radial_stats
from edge.anomaly import AnomalyInputError, AnomalyModel, ModelFileError, ModelSelfTestError, default_model_path
from edge.anomaly_data import CLASSES, make_dataset
from edge.features import N_FEATURES
from edge.sim import simulate

MODELS = default_model_path().parent
CARD = json.loads((MODELS / "model_card.json").read_text())
# fresh seeds: never used for training, validation or the card's held-out set
FRESH = range(CARD["data"]["fresh_seeds_from"] + 1000, CARD["data"]["fresh_seeds_from"] + 1240)


def _ranges_overlap(a, b):
    return a.start < b[1] and b[0] < a.stop


@pytest.fixture(scope="module")
def model():
    return AnomalyModel.load()


@pytest.fixture(scope="module")
def fresh():
    """240 fresh simulated frames: features and labels."""
    return make_dataset(FRESH)


# ---------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------
def test_shipped_model_matches_card():
    blob = (MODELS / "anomaly_int8.tflite").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == CARD["files"]["tflite"]["sha256"]
    onnx_blob = (MODELS / "anomaly.onnx").read_bytes()
    assert hashlib.sha256(onnx_blob).hexdigest() == CARD["files"]["onnx"]["sha256"]
    assert len(blob) <= 200 * 1024
    assert tuple(CARD["classes"]) == CLASSES
    assert CARD["input"]["n_features"] == N_FEATURES


def test_fresh_seeds_are_disjoint_from_training():
    for name, split in CARD["data"]["splits"].items():
        assert not _ranges_overlap(FRESH, split["seeds"]), name


def test_loads_with_litert_int8_io(model):
    from ai_edge_litert.interpreter import Interpreter

    assert isinstance(model._it, Interpreter)
    ind = model._it.get_input_details()[0]
    outd = model._it.get_output_details()[0]
    assert ind["dtype"] == np.int8 and outd["dtype"] == np.int8
    assert ind["quantization"][0] > 0 and outd["quantization"][0] > 0
    r = model.predict(np.zeros(N_FEATURES, np.float32))
    assert set(r.probabilities) == set(CLASSES)
    assert all(0.0 <= p <= 1.0 for p in r.probabilities.values())
    assert set(r.flags) <= set(CLASSES)


def test_thread_count_does_not_change_results(model, fresh):
    x = fresh[0][:20]
    m2 = AnomalyModel.load(num_threads=2)
    np.testing.assert_array_equal(model.predict_proba(x), m2.predict_proba(x))


# ---------------------------------------------------------------------------
# int8 vs float, accuracy on fresh frames
# ---------------------------------------------------------------------------
def test_int8_matches_float_onnx(model, fresh):
    import onnxruntime as ort

    x, _ = fresh
    sess = ort.InferenceSession(str(MODELS / "anomaly.onnx"), providers=["CPUExecutionProvider"])
    xs = np.clip((x - np.asarray(CARD["input"]["mean"], np.float32)) / np.asarray(CARD["input"]["std"], np.float32),
                 -CARD["input"]["clip"], CARD["input"]["clip"]).astype(np.float32)
    p_float = sess.run(None, {"features": xs})[0]
    p_int8 = model.predict_proba(x)
    agree = np.mean((p_float >= model.thresholds) == (p_int8 >= model.thresholds))
    assert agree >= 0.99, agree
    assert np.percentile(np.abs(p_float - p_int8), 99) < 0.1


#: Acceptance bar for the card's held-out metrics (int8 model): macro F1 >= 0.97
#: and every class >= 0.93. The float ONNX reference must be close behind.
ACCEPT_MACRO, ACCEPT_CLASS = 0.97, 0.93


def _heldout(name):
    m = CARD["metrics_heldout"][name]
    return m["macro_f1"], {c: v["f1"] for c, v in m["per_class"].items()}


def _assert_heldout_at_least(macro_min, class_min):
    """The card's held-out F1 (int8, and the float ONNX reference within 0.01) and int8/float agreement."""
    macro, per = _heldout("int8_tflite")
    assert macro >= macro_min and min(per.values()) >= class_min, (macro, per)
    macro_f, per_f = _heldout("float_onnx")
    assert macro_f >= macro_min - 0.01 and min(per_f.values()) >= class_min - 0.01, (macro_f, per_f)
    assert CARD["int8_vs_float"]["flag_agreement"] >= 0.99


def test_card_heldout_metrics_meet_acceptance_bar():
    # v13 on the recipe-13 held-out split: macro 0.9722, weakest class
    # detector_fault 0.938 (v7: 0.9693, the same members without the
    # saturation head; v6 0.955, v5 0.950)
    _assert_heldout_at_least(ACCEPT_MACRO, ACCEPT_CLASS)
    gated = CARD["metrics_heldout_gated"]
    assert gated["frames"] >= 150
    assert gated["confirmed_flags"]["normal_false_alarm_rate"] <= 0.05


#: Per-class precision/recall floor on the fresh frames (240 frames, so one
#: frame moves a class with ~40 positives by 2.5 %).
FRESH_FLOOR = 0.85
#: Recall on the fresh frames is lower for the classes whose faint cases the
#: features see least (ice around a beam far off the believed centre,
#: off-centre beams and faults at low counts): v6 ice 0.86, off-centre beam
#: 0.83 (24 positives: one frame is 4 %), fault 0.87 (v5: 0.80 / 0.75 / 0.85).
FRESH_RECALL_FLOOR = {"ice_rings": 0.7, "beam_off_center": 0.65, "detector_fault": 0.75}
FRESH_PRECISION_FLOOR = {"ice_rings": 0.8}


def test_per_class_precision_recall_on_fresh_frames(model, fresh):
    x, y = fresh
    flags = model.predict_proba(x) >= model.thresholds
    true = y > 0.5
    report = {}
    for c, name in enumerate(CLASSES):
        tp = np.sum(flags[:, c] & true[:, c])
        prec = tp / max(flags[:, c].sum(), 1)
        rec = tp / max(true[:, c].sum(), 1)
        report[name] = (round(float(prec), 3), round(float(rec), 3), int(true[:, c].sum()))
    print(report)
    for name, (prec, rec, support) in report.items():
        assert support >= 10, (name, support)  # the fresh set exercises every class
        assert prec >= FRESH_PRECISION_FLOOR.get(name, FRESH_FLOOR), (name, prec, rec)
        assert rec >= FRESH_RECALL_FLOOR.get(name, FRESH_FLOOR), (name, prec, rec)
    normal = ~true.any(axis=1)
    assert np.mean(flags[normal].any(axis=1)) <= 0.1


def test_hot_cluster_out_of_sight_is_left_out_of_the_data():
    """Recipe v6: a hot cluster drawn into a module gap (or a dead module)
    reads on no valid pixel; its frame cannot be labelled from the photons
    and is left out, while a visible cluster stays in as ``detector_fault``."""
    from edge.anomaly_data import MIN_HOT_CLUSTER_PX, excluded, simulate_scenario

    hidden, y = simulate_scenario(200769)  # no beam + a cluster inside the 1M's module gap
    assert hidden.config.hot_cluster and y[CLASSES.index("detector_fault")] == 1
    assert hidden.hot_cluster_px == 0 and excluded(hidden)
    assert np.count_nonzero(hidden.frame >= 200) < MIN_HOT_CLUSTER_PX  # only isolated hot pixels
    seen, y = simulate_scenario(200250)
    assert seen.config.hot_cluster and seen.hot_cluster_px >= MIN_HOT_CLUSTER_PX and not excluded(seen)


# ---------------------------------------------------------------------------
# Real PILATUS frames
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_results(real_frames, model):
    out = {}
    for key, (frame, geom) in real_frames.items():
        stats = radial_stats(frame, geometry=geom)
        peaks = find_peaks(frame, geometry=geom, stats=stats)
        out[key] = model.classify(frame, geom, stats=stats, peaks=peaks)
    return out


@pytest.mark.parametrize("key", ["strong1", "strong2"])
def test_real_strong_hits_not_flagged(real_results, key):
    r = real_results[key]
    assert r.flags == (), r.probabilities


def test_real_weak_hit_not_flagged(real_results):
    r = real_results["weak"]
    assert r.flags == (), r.probabilities


def test_real_blank_flagged_blank(real_results):
    r = real_results["blank"]
    assert r.flags == ("blank",), r.probabilities


def test_classify_computes_stats_and_peaks_itself(real_frames, model, real_results):
    frame, geom = real_frames["blank"]
    r = model.classify(frame, geom)
    np.testing.assert_array_equal(r.raw, real_results["blank"].raw)


# ---------------------------------------------------------------------------
# The pipeline's scripted scenario, frame by frame
# ---------------------------------------------------------------------------
SCENARIO_FRAMES = 3  # per phase (simulator seeds far from every training seed)


def _scenario_cases():
    from edge.scenario import default_scenario

    cases = [("clean", {}, ())]
    for p in default_scenario().phases:
        # weak diffraction is a peak-statistics condition, not a model class:
        # the model must not flag it (in particular not as blank)
        cases.append((p.name, dict(p.sim), tuple(sorted(p.labels - {"weak_diffraction"}))))
    return cases


@pytest.mark.parametrize("name,sim,want", _scenario_cases(), ids=[c[0] for c in _scenario_cases()])
def test_default_scenario_phases_flagged_exactly(model, name, sim, want):
    got = []
    for k in range(SCENARIO_FRAMES):
        sf = simulate(layout="1m", seed=CARD["data"]["fresh_seeds_from"] + 50_000 + 100 * k + len(name), **sim)
        stats = radial_stats(sf.frame, geometry=sf.geometry)
        peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
        r = model.classify(sf.frame, sf.geometry, stats=stats, peaks=peaks)
        got.append((tuple(sorted(r.flags)), {c: round(v, 2) for c, v in r.probabilities.items()}))
    assert all(flags == want for flags, _ in got), (name, want, got)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def test_bad_features(model):
    with pytest.raises(AnomalyInputError, match="shape"):
        model.predict(np.zeros(N_FEATURES - 1, np.float32))
    with pytest.raises(AnomalyInputError, match="shape"):
        model.predict(np.zeros((2, 3, N_FEATURES), np.float32))
    with pytest.raises(AnomalyInputError, match="dtype"):
        model.predict(np.array(["a"] * N_FEATURES))
    bad = np.zeros(N_FEATURES, np.float32)
    bad[3] = np.nan
    with pytest.raises(AnomalyInputError, match="NaN"):
        model.predict(bad)
    assert issubclass(AnomalyInputError, ValueError)


def test_bad_frames(model):
    sf = simulate(layout="1m", seed=3, n_spots=30)
    g = sf.geometry
    with pytest.raises(AnomalyInputError, match="2-D"):
        model.classify(sf.frame.ravel(), g)
    with pytest.raises(AnomalyInputError, match="shape"):
        model.classify(sf.frame[:, :-3], g)
    with pytest.raises(AnomalyInputError, match="dtype"):
        model.classify(sf.frame.astype(bool), g)
    with pytest.raises(AnomalyInputError, match="NaN"):
        model.classify(np.full(g.shape, np.nan, np.float32), g)
    half_nan = sf.frame.astype(np.float32)
    half_nan[: g.shape[0] // 2] = np.nan
    with pytest.raises(AnomalyInputError, match="NaN"):
        model.classify(half_nan, g)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        AnomalyModel.load(tmp_path / "nope.tflite")
    shutil.copy(MODELS / "anomaly_int8.tflite", tmp_path / "m.tflite")
    with pytest.raises(ModelFileError, match="card not found"):
        AnomalyModel.load(tmp_path / "m.tflite")


def test_corrupt_model_file_sha_mismatch(tmp_path):
    blob = bytearray((MODELS / "anomaly_int8.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "anomaly_int8.tflite").write_bytes(bytes(blob))
    shutil.copy(MODELS / "model_card.json", tmp_path / "model_card.json")
    with pytest.raises(ModelFileError, match="sha256"):
        AnomalyModel.load(tmp_path / "anomaly_int8.tflite")


def test_corrupt_model_file_unparseable(tmp_path):
    junk = b"not a flatbuffer" * 64
    card = json.loads(json.dumps(CARD))
    card["files"]["tflite"]["sha256"] = hashlib.sha256(junk).hexdigest()  # the card vouches for junk
    (tmp_path / "m.tflite").write_bytes(junk)
    with pytest.raises(ModelFileError, match="not a valid TFLite model"):
        AnomalyModel.load(tmp_path / "m.tflite", card=card)


def test_corrupt_card(tmp_path):
    shutil.copy(MODELS / "anomaly_int8.tflite", tmp_path / "anomaly_int8.tflite")
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable"):
        AnomalyModel.load(tmp_path / "anomaly_int8.tflite")
    (tmp_path / "model_card.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(ModelFileError, match="missing"):
        AnomalyModel.load(tmp_path / "anomaly_int8.tflite")


def test_bad_thread_count():
    with pytest.raises(ValueError):
        AnomalyModel.load(num_threads=0)


# ---------------------------------------------------------------------------
# Self-test at load (models/golden.json)
# ---------------------------------------------------------------------------
GOLDEN = json.loads((MODELS / "golden.json").read_text())


def _model_dir(tmp_path, golden=None):
    """The shipped model and card in tmp_path, with ``golden`` (dict) or the shipped golden file."""
    for name in ("anomaly_int8.tflite", "model_card.json"):
        shutil.copy(MODELS / name, tmp_path / name)
    (tmp_path / "golden.json").write_text(json.dumps(golden if golden is not None else GOLDEN))
    return tmp_path / "anomaly_int8.tflite"


def test_self_test_passes_on_the_default_path(model):
    st = model.self_test
    assert st.runtime_path == "default" and model.runtime_path == "default"
    assert st.failed == {} and st.cases == len(GOLDEN["cases"]) >= 10
    assert "passed" in st.summary() and "FAILED" not in st.summary()
    assert GOLDEN["model_sha256"] == CARD["files"]["tflite"]["sha256"]


def test_golden_file_covers_every_class_and_the_issue_case():
    names = [c["name"] for c in GOLDEN["cases"]]
    assert names[0] == "all-zero int8 input"
    assert GOLDEN["cases"][0]["input_int8"] == [0] * N_FEATURES
    # v13 model (v7's members: the same output), recorded on x86-64 (v6 gave [-42, -122, -126, -128, 57, -121]
    # there, and QEMU's "max" CPU made XNNPACK return [-128]*5 + [87] for v3)
    assert GOLDEN["cases"][0]["output_int8"] == [-71, -120, -127, -128, 52, -119]
    labels = {lab for n in names if n.startswith("seed ") for lab in n.split(": ")[1].split("+")}
    assert labels >= set(CLASSES) | {"normal"}


def test_golden_file_regenerates_identically(tmp_path):
    from models.golden import main as golden_main

    assert golden_main(["--out", str(tmp_path / "g.json")]) == 0
    new = json.loads((tmp_path / "g.json").read_text())
    assert new["model_sha256"] == GOLDEN["model_sha256"]
    for a, b in zip(new["cases"], GOLDEN["cases"], strict=True):
        assert (a["name"], a["input_int8"], a["output_int8"]) == (b["name"], b["input_int8"], b["output_int8"])


def test_tampered_golden_output_refused_loudly(tmp_path):
    bad = json.loads(json.dumps(GOLDEN))
    got = GOLDEN["cases"][0]["output_int8"][0]
    bad["cases"][0]["output_int8"][0] = got + 20 if got <= 107 else got - 20  # no runtime path reproduces that
    path = _model_dir(tmp_path, bad)
    with pytest.raises(ModelSelfTestError, match="self-test FAILED.*refusing to flag") as exc:
        AnomalyModel.load(path)
    for name in ("default", "builtin", "reference"):
        assert f"{name}: golden input 'all-zero int8 input' gave [{got}," in str(exc.value)


def test_tampered_golden_features_refused(tmp_path):
    bad = json.loads(json.dumps(GOLDEN))
    k = next(i for i, c in enumerate(bad["cases"]) if c["features"] is not None)
    bad["cases"][k]["features"] = [v + 1e3 for v in bad["cases"][k]["features"]]
    with pytest.raises(ModelSelfTestError, match="quantising golden features"):
        AnomalyModel.load(_model_dir(tmp_path, bad))


def test_golden_of_another_model_missing_or_malformed(tmp_path):
    other = dict(GOLDEN, model_sha256="0" * 64)
    with pytest.raises(ModelFileError, match="re-run python -m models.golden"):
        AnomalyModel.load(_model_dir(tmp_path, other))
    (tmp_path / "golden.json").unlink()
    with pytest.raises(ModelFileError, match="golden file not found"):
        AnomalyModel.load(tmp_path / "anomaly_int8.tflite")
    (tmp_path / "golden.json").write_text("{")
    with pytest.raises(ModelFileError, match="unreadable"):
        AnomalyModel.load(tmp_path / "anomaly_int8.tflite")
    for broken in ({**GOLDEN, "cases": []}, {**GOLDEN, "tolerance_lsb": 100},
                   {**GOLDEN, "cases": [{"name": "x", "input_int8": [300] * N_FEATURES, "output_int8": [0] * 6}]},
                   {k: v for k, v in GOLDEN.items() if k != "cases"}):
        (tmp_path / "golden.json").write_text(json.dumps(broken))
        with pytest.raises(ModelFileError, match="malformed"):
            AnomalyModel.load(tmp_path / "anomaly_int8.tflite")


def _wrong_runtime(monkeypatch, wrong_paths):
    """Make the real interpreter return the outputs seen with XNNPACK on QEMU's "max" CPU
    (SVE/SME) for the runtime paths in ``wrong_paths``; the model still runs for real."""
    import types

    from ai_edge_litert import interpreter as real
    from edge import anomaly

    wrong = {getattr(real.OpResolverType, anomaly.RUNTIME_PATHS[p]) for p in wrong_paths}

    class Interpreter(real.Interpreter):
        def __init__(self, *a, experimental_op_resolver_type=real.OpResolverType.AUTO, **kw):
            super().__init__(*a, experimental_op_resolver_type=experimental_op_resolver_type, **kw)
            self._wrong = experimental_op_resolver_type in wrong

        def get_tensor(self, index, *a):
            out = super().get_tensor(index, *a)
            if self._wrong and index == self.get_output_details()[0]["index"]:
                out = np.array([[-128, -128, -128, -128, -128, 87]], np.int8)
            return out

    monkeypatch.setattr(anomaly, "_interpreter_module",
                        lambda: types.SimpleNamespace(Interpreter=Interpreter, OpResolverType=real.OpResolverType))


def test_wrong_xnnpack_outputs_fall_back_to_a_path_that_matches(monkeypatch, model):
    _wrong_runtime(monkeypatch, ["default"])
    with pytest.warns(RuntimeWarning, match="XNNPACK.*WRONG outputs.*'builtin' path"):
        fallback = AnomalyModel.load()
    assert fallback.runtime_path == "builtin"
    assert "default" in fallback.self_test.failed and "[-128, -128, -128, -128, -128, 87]" in \
        fallback.self_test.summary()
    # the fallback's flags are the shipped model's, not the wrong path's
    x = np.array([c["features"] for c in GOLDEN["cases"] if c["features"] is not None], np.float32)
    np.testing.assert_allclose(fallback.predict_proba(x), model.predict_proba(x), atol=4 / 256)


def test_wrong_outputs_on_every_path_refuse_the_model(monkeypatch):
    _wrong_runtime(monkeypatch, ["default", "builtin", "reference"])
    with pytest.raises(ModelSelfTestError, match="refusing to flag anything"):
        AnomalyModel.load()


def test_edge_run_refuses_a_model_that_fails_its_self_test(tmp_path):
    import subprocess
    import sys

    bad = json.loads(json.dumps(GOLDEN))
    bad["cases"][3]["output_int8"] = [0] * 6
    path = _model_dir(tmp_path, bad)
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--model", str(path), "--frames", "1",
                        "--dry-run", "--rate", "max", "--results", str(tmp_path / "r.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "self-test FAILED" in r.stderr and "warming up" not in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_edge_info_reports_self_test_threading_layer_and_cobs():
    import subprocess
    import sys

    from cobs import cobs

    r = subprocess.run([sys.executable, "-m", "edge.cli", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import numba  # the layer this interpreter would pick; libgomp is present here, so OpenMP, and no warning

    from numba.np.ufunc import omppool  # noqa: F401
    assert "(layer omp;" in r.stdout and "WARNING" not in r.stdout + r.stderr
    assert numba.config.THREADING_LAYER in ("default", "omp")
    want = "C extension" if cobs._using_extension else "pure Python (no C extension built)"
    assert f"cobs framing:   {want}" in r.stdout
    assert "self-test:      passed (13 golden inputs, within 4 LSB) on the 'default' runtime path" in r.stdout
