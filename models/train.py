"""Train and export the frame-anomaly model: ``python -m models.train``.

One command regenerates the simulated data (cached under ``runs/`` only as a
speed-up), trains an ensemble of small Keras MLPs (averaged in one graph) on
:func:`edge.features.frame_features` (all but :data:`HEAD_ONLY`), calibrates
them, fits the saturation head (see :func:`attach_head`),
tunes per-class thresholds on a validation split, evaluates on a held-out
split, and writes

* ``models/anomaly_int8.tflite`` - full-integer (int8 in, int8 out) model,
* ``models/anomaly.onnx`` - the same network in float32 (built with
  ``onnx.helper`` from the trained weights, checked with ``onnx.checker``),
* ``models/model_card.json`` - classes, input spec, thresholds, data recipe,
  held-out metrics, int8-vs-float agreement, sha256 of both files, versions.

Needs the training environment (TensorFlow >= 2.15, onnx, onnxruntime,
ai-edge-litert); the runtime never imports this module. Deterministic: fixed
seeds for data, weight init and shuffling, and TensorFlow op determinism.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np


def _training_env() -> None:
    """One Numba thread per data process, quiet TensorFlow: called before
    numba or tensorflow load (by main and by each worker), not at import,
    so importing this module (the tests do) leaves the caller's threads alone."""
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


MODELS = Path(__file__).resolve().parent
ROOT = MODELS.parent
CACHE = ROOT / "runs" / "anomaly_cache"  # gitignored; never required

#: Seed ranges (half-open). Held-out and test seeds are never used in training.
SPLITS = {
    "train": (0, 16000),
    "validation": (100_000, 101_000),  # threshold tuning only
    "heldout": (200_000, 201_000),     # reported metrics
}
#: Held-out seeds whose frames are re-simulated to measure the flags after the
#: evidence gate (the runtime's full classify path; a few minutes).
GATED_HELDOUT = (200_000, 200_200)
#: Seeds from here on are free for tests ("fresh" frames).
FRESH_SEEDS_FROM = 900_000
#: Seeds per cache file.
BLOCK = 2000
RECIPE_VERSION = 13  # bump when edge.anomaly_data or edge.features change
MODEL_VERSION = 13
CLIP = 6.0  # standardised features are clipped to +-CLIP before the network
HIDDEN = (128, 64)
#: A tuned class threshold replaces 0.5 only when it gains this much
#: validation F1 (about the F1 noise of ~250 positives).
THRESHOLD_MIN_GAIN = 0.01
#: Independently trained MLPs averaged in the shipped model (see build_model).
MEMBERS = 5
#: Regularisation (v1 overfitted: train macro F1 0.999 vs validation 0.94).
DROPOUT = 0.2
L2 = 1e-4
INPUT_NOISE = 0.1  # std of Gaussian noise on the standardised features (training only)
EPOCHS = 120
BATCH = 128
SEED = 1234
#: Features the network does not see: their std is set to DISABLED_STD so the
#: standardised value is 0. The most negative row / column z-sums are off
#: because PILATUS module-edge rows and columns (real frames) reach values
#: never simulated (with col_z_min on, the real strong hits were flagged
#: beam_off_center); the bright-run features because real spots are larger
#: than simulated ones.
#: v4 also disables the two innermost polar-grid rings (< 60 px: the beamstop
#: and its arm) and their harmonics: with them, the model trained on recipe v5
#: proposed beam_off_center on the real PILATUS strong and weak hits (0.47,
#: 0.74: real beamstop shadows are shaped unlike simulated ones); without
#: them, 0.24 and 0.44 at the same held-out macro F1.
DISABLED = ("row_z_min", "col_z_min", "row_z_max", "col_z_max", "log2_bright_run_max", "log_rows_long_bright_run") + tuple(
    f"grid_r{r}_s{s}" for r in (0, 1) for s in range(8)) + ("harmonic1_r0", "harmonic1_r1")
DISABLED_STD = 1.0e30
#: Inputs the members do not read; only the head of HEAD_CLASS does (see
#: attach_head). ``overload_core`` is the saturation label's own rule measured
#: at full resolution around saturated peaks: as a member input (v12) the
#: saturation gain came with retraining noise in every other class, so the
#: members stay as trained without it and one pass-through unit per layer
#: carries it to the saturation logit.
HEAD_ONLY = ("overload_core",)
HEAD_CLASS = "saturation"
#: Largest weight of the head input on the saturation logit (the indicator
#: implies the label, so an unbounded fit would diverge).
HEAD_WEIGHT_MAX = 12.0


def _chunk(args):
    lo, hi = args
    _training_env()
    from edge.anomaly_data import make_dataset

    return make_dataset(range(lo, hi))


def source_hash() -> str:
    """Short hash of the code that makes the data (simulator, recipe, features;
    docstrings and comments excluded): part of the cache file name, so any
    code change there invalidates the cache."""
    import ast

    h = hashlib.sha256()
    for mod in ("sim.py", "anomaly_data.py", "features.py", "background.py", "spotfinding.py", "evidence/ice.py"):
        tree = ast.parse((ROOT / "edge" / mod).read_text())
        for node in ast.walk(tree):  # docstrings and comments do not change the data
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:10]


def dataset(name: str, *, workers: int = 2, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one split (generated in parallel, optionally cached)."""
    from edge.features import N_FEATURES

    lo, hi = SPLITS[name]
    if hi - lo > BLOCK:  # cached in blocks of BLOCK seeds
        parts = [dataset_block(name, a, min(a + BLOCK, hi), workers=workers, use_cache=use_cache)
                 for a in range(lo, hi, BLOCK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return dataset_block(name, lo, hi, workers=workers, use_cache=use_cache)


def dataset_block(name: str, lo: int, hi: int, *, workers: int = 2,
                  use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of seeds ``lo..hi-1`` of one split."""
    from edge.features import N_FEATURES

    path = CACHE / f"{name}_{lo}_{hi}_v{RECIPE_VERSION}_f{N_FEATURES}_{source_hash()}.npz"
    if use_cache and path.exists():
        d = np.load(path)
        return d["x"], d["y"]
    t0 = time.time()
    step = 100
    chunks = [(a, min(a + step, hi)) for a in range(lo, hi, step)]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_chunk, chunks)
    else:
        parts = [_chunk(c) for c in chunks]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    print(f"[data] {name} {lo}-{hi}: {len(x)} frames in {time.time() - t0:.0f} s", flush=True)
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=x, y=y)
    return x, y


def _standardise(x, mean, std):
    return np.clip((x - mean) / std, -CLIP, CLIP).astype(np.float32)


def build_model(n_in: int, n_out: int):
    """(training model, inference model): MEMBERS independent MLPs on the same input.

    The training model has one output (and one loss) per member, so members do
    not co-adapt; the inference model averages their probabilities. Averaging
    independently initialised members smooths the decision function away from
    the simulated data (the real frames are not simulated).
    """
    import keras
    from keras import layers

    inp = keras.Input((n_in,), name="features")
    h0 = inp
    if INPUT_NOISE > 0:
        h0 = layers.GaussianNoise(INPUT_NOISE, name="input_noise")(h0)
    outs = []
    for m in range(MEMBERS):
        h = h0
        for k, width in enumerate(HIDDEN):
            h = layers.Dense(width, activation="relu", name=f"m{m}_dense{k}",
                             kernel_regularizer=keras.regularizers.l2(L2) if L2 > 0 else None)(h)
            if DROPOUT > 0:
                h = layers.Dropout(DROPOUT, name=f"m{m}_dropout{k}")(h)
        outs.append(layers.Dense(n_out, activation="sigmoid", name=f"m{m}_probabilities")(h))
    train_model = keras.Model(inp, outs)
    avg = layers.Average(name="probabilities")(outs) if MEMBERS > 1 else outs[0]
    return train_model, keras.Model(inp, avg)


def train(xs, ys, xv, yv, *, epochs: int = EPOCHS):
    """Members trained on ``xs`` (the member columns); returns the inference model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    train_model, model = build_model(xs.shape[1], ys.shape[1])
    train_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=["binary_crossentropy"] * MEMBERS)
    sched = keras.callbacks.LearningRateScheduler(lambda e, lr: 1e-3 if e < epochs * 0.6 else 3e-4)
    train_model.fit(xs, [ys] * MEMBERS, validation_data=(xv, [yv] * MEMBERS), epochs=epochs, batch_size=BATCH,
                    shuffle=True, verbose=0, callbacks=[sched])
    return model


# ---------------------------------------------------------------------------
# Member weights as NumPy, the saturation head, and the exported graph
# ---------------------------------------------------------------------------
def member_weights(model) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """[(W, b) per Dense layer] per member of an inference model (float32)."""
    out = []
    for m in range(MEMBERS):
        dense = [layer for layer in model.layers
                 if layer.__class__.__name__ == "Dense" and layer.name.startswith(f"m{m}_")]
        out.append([tuple(np.asarray(a, np.float32) for a in layer.get_weights()) for layer in dense])
    return out


def load_members(folder: Path, member_names: list[str], mean: np.ndarray, std: np.ndarray):
    """Calibrated member weights of a shipped model (``anomaly.onnx`` and
    ``model_card.json`` in ``folder``) and its card.

    The loaded members must have read exactly ``member_names`` with the same
    normalisation (so the data they were trained on is the data here)."""
    import onnx
    from onnx import numpy_helper

    card = json.loads((folder / "model_card.json").read_text())
    names = card["input"]["features"]
    if names != member_names:
        raise SystemExit(f"{folder}: the members read {len(names)} features, this recipe's members "
                         f"{len(member_names)} (or another order)")
    m0, s0 = np.asarray(card["input"]["mean"], np.float64), np.asarray(card["input"]["std"], np.float64)
    if not (np.allclose(m0, mean, rtol=1e-5, atol=1e-6) and np.allclose(s0, std, rtol=1e-5, atol=1e-6)):
        raise SystemExit(f"{folder}: input normalisation differs from this training split's: different data")
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "anomaly.onnx")).graph.initializer}
    members = []
    for m in range(MEMBERS):
        layers_ = []
        k = 0
        while f"m{m}_W{k}" in init:
            layers_.append((init[f"m{m}_W{k}"].astype(np.float32), init[f"m{m}_B{k}"].astype(np.float32)))
            k += 1
        if [w.shape for w, _ in layers_] != [(len(member_names), HIDDEN[0]), (HIDDEN[0], HIDDEN[1]),
                                              (HIDDEN[1], len(card["classes"]))]:
            raise SystemExit(f"{folder}: member {m} is not a {len(member_names)}-{HIDDEN}-classes MLP")
        members.append(layers_)
    if f"m{MEMBERS}_W0" in init:
        raise SystemExit(f"{folder}: more than {MEMBERS} members")
    return members, card


def logits_np(members, x: np.ndarray) -> np.ndarray:
    """Member logits (members, n, classes), float64."""
    out = []
    for layers_ in members:
        h = np.asarray(x, np.float64)
        for k, (w, b) in enumerate(layers_):
            h = h @ w.astype(np.float64) + b.astype(np.float64)
            if k < len(layers_) - 1:
                h = np.maximum(h, 0.0)
        out.append(h)
    return np.stack(out)


def fit_head(z: np.ndarray, u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, c, d) minimising the log loss of mean_m sigmoid(a z_m + c u + d).

    z: member logits of the head class (members, n); u: head input (n,), 0/1;
    y: labels. Coordinate descent on grids that start over the whole allowed
    range and halve each sweep (deterministic); c is kept in [0,
    HEAD_WEIGHT_MAX], a in [0.125, 4], d in [-6, 6]."""
    yc = y > 0.5

    def loss(a, c, d):
        p = np.clip(_sigmoid(a * z + c * u[None, :] + d).mean(axis=0), 1e-7, 1 - 1e-7)
        return -np.mean(np.where(yc, np.log(p), np.log(1 - p)))

    a, c, d = 1.0, 0.0, 0.0
    bounds = ((0.125, 4.0), (0.0, HEAD_WEIGHT_MAX), (-6.0, 6.0))
    span = [hi - lo for lo, hi in bounds]  # the first sweep sees every allowed value
    for _ in range(16):
        for k in range(3):
            cur = [a, c, d]
            lo, hi = bounds[k]
            grid = np.clip(np.linspace(cur[k] - span[k], cur[k] + span[k], 41), lo, hi)
            vals = []
            for g in grid:
                cur[k] = g
                vals.append(loss(*cur))
            cur[k] = float(grid[int(np.argmin(vals))])
            a, c, d = cur
        span = [v * 0.5 for v in span]
    return a, c, d


def head_unit(mean_j: float, std_j: float) -> tuple[float, float]:
    """(scale, shift) with relu(scale * x + shift) = the 0/1 head input, for
    x its standardised, clipped value."""
    x0 = float(np.clip((0.0 - mean_j) / std_j, -CLIP, CLIP))
    x1 = float(np.clip((1.0 - mean_j) / std_j, -CLIP, CLIP))
    if not x1 - x0 > 1e-3:
        raise SystemExit("head input: 0 and 1 standardise to the same value (no variance in training)")
    return 1.0 / (x1 - x0), -x0 / (x1 - x0)


def attach_head(members, n_in: int, member_cols: list[int], head_col: int, unit: tuple[float, float],
                cls: int, head: tuple[float, float, float]):
    """Members widened by one pass-through unit per hidden layer: the head
    input reaches class ``cls``'s logit as a z + c u + d, every other output
    is unchanged (zero weights to and from the new units)."""
    a, c, d = head
    out = []
    for (w0, b0), (w1, b1), (w2, b2) in members:
        h0, h1 = w0.shape[1], w1.shape[1]
        W0 = np.zeros((n_in, h0 + 1), np.float32)
        W0[member_cols, :h0] = w0
        W0[head_col, h0] = unit[0]
        B0 = np.append(b0, np.float32(unit[1])).astype(np.float32)
        W1 = np.zeros((h0 + 1, h1 + 1), np.float32)
        W1[:h0, :h1] = w1
        W1[h0, h1] = 1.0
        B1 = np.append(b1, np.float32(0.0)).astype(np.float32)
        W2 = np.zeros((h1 + 1, w2.shape[1]), np.float32)
        W2[:h1] = w2
        B2 = b2.astype(np.float32).copy()
        W2[:h1, cls] *= a
        B2[cls] = a * B2[cls] + d
        W2[h1, cls] = c
        out.append([(W0, B0), (W1, B1), (W2, B2)])
    return out


def inference_model(members, n_in: int):
    """Keras graph of the mean of the members' sigmoid outputs (for export)."""
    import keras
    from keras import layers

    inp = keras.Input((n_in,), name="features")
    outs = []
    for m, layers_ in enumerate(members):
        h = inp
        for k, (w, b) in enumerate(layers_):
            last = k == len(layers_) - 1
            dense = layers.Dense(w.shape[1], activation="sigmoid" if last else "relu",
                                 name=f"m{m}_probabilities" if last else f"m{m}_dense{k}")
            h = dense(h)
            dense.set_weights([w, b])
        outs.append(h)
    avg = layers.Average(name="probabilities")(outs) if len(outs) > 1 else outs[0]
    return keras.Model(inp, avg)


def tune_thresholds(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class thresholds: 0.5 unless another threshold beats it on the
    validation split by at least THRESHOLD_MIN_GAIN in F1 (then the best one,
    ties nearest 0.5). Plain F1 maximisation on ~1000 frames picked extreme
    values (0.08 for beam_off_center) that did worse on held-out frames."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    out = np.full(p.shape[1], 0.5)
    for c in range(p.shape[1]):
        f1 = np.array([_prf(p[:, c] >= t, y[:, c] > 0.5)[2] for t in grid])
        f_half = _prf(p[:, c] >= 0.5, y[:, c] > 0.5)[2]
        if f1.max() >= f_half + THRESHOLD_MIN_GAIN:
            best = np.flatnonzero(f1 >= f1.max() - 1e-9)
            out[c] = grid[best[np.argmin(np.abs(grid[best] - 0.5))]]
    return out


def _prf(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    tp = float(np.count_nonzero(pred & true))
    fp = float(np.count_nonzero(pred & ~true))
    fn = float(np.count_nonzero(~pred & true))
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def metrics(flags: np.ndarray, y: np.ndarray, classes) -> dict:
    true = y > 0.5
    per = {}
    for c, name in enumerate(classes):
        p, r, f = _prf(flags[:, c], true[:, c])
        per[name] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                     "support": int(true[:, c].sum())}
    normal_true = ~true.any(axis=1)
    normal_pred = ~flags.any(axis=1)
    return {
        "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])), 4),
        "per_class": per,
        "exact_match": round(float(np.mean((flags == true).all(axis=1))), 4),
        "normal_frames": int(normal_true.sum()),
        "normal_false_alarm_rate": round(float(np.mean(~normal_pred[normal_true])) if normal_true.any() else 0.0, 4),
    }


def member_logits(model, x: np.ndarray) -> np.ndarray:
    """Pre-sigmoid outputs (members, n, classes) of the inference model, in NumPy (float64)."""
    return logits_np(member_weights(model), x)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


#: Temperatures tried per class (calibration).
TEMPERATURES = np.geomspace(0.25, 8.0, 241)


def fit_temperatures(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class temperature T minimising the validation log loss of the
    ensemble mean of sigmoid(z / T) (z: member logits, members x n x classes)."""
    t = np.ones(z.shape[2])
    for c in range(z.shape[2]):
        yc = y[:, c] > 0.5
        loss = []
        for temp in TEMPERATURES:
            p = np.clip(_sigmoid(z[:, :, c] / temp).mean(axis=0), 1e-7, 1 - 1e-7)
            loss.append(-np.mean(np.where(yc, np.log(p), np.log(1 - p))))
        t[c] = TEMPERATURES[int(np.argmin(loss))]
    return t


def fold_temperatures(model, temps: np.ndarray) -> None:
    """Divide each member's output layer (weights and bias) by the class
    temperatures, so the exported graphs (int8 and float) are calibrated."""
    for m in range(MEMBERS):
        layer = model.get_layer(f"m{m}_probabilities")
        w, b = layer.get_weights()
        layer.set_weights([(w / temps[None, :]).astype(w.dtype), (b / temps).astype(b.dtype)])


def reliability(p: np.ndarray, y: np.ndarray, classes, bins: int = 10) -> dict:
    """Expected calibration error per class (equal-width probability bins):
    sum over bins of (frames in bin / frames) x |mean probability - positive rate|."""
    out = {}
    edges = np.linspace(0.0, 1.0, bins + 1)
    for c, name in enumerate(classes):
        k = np.clip(np.digitize(p[:, c], edges[1:-1]), 0, bins - 1)
        n = np.bincount(k, minlength=bins)
        sp = np.bincount(k, p[:, c], minlength=bins)
        sy = np.bincount(k, (y[:, c] > 0.5).astype(np.float64), minlength=bins)
        ok = n > 0
        out[name] = round(float(np.sum(np.abs(sp[ok] - sy[ok])) / len(p)), 4)
    out["mean"] = round(float(np.mean([out[c] for c in classes])), 4)
    return out


def _gated_chunk(args):
    """Raw and gated flags of the non-excluded frames of seeds lo..hi-1 (the
    runtime's classify path: int8 model, then edge.evidence.EvidenceGate)."""
    lo, hi, blob, spec = args
    _training_env()
    from edge.anomaly import AnomalyModel, make_interpreter
    from edge.anomaly_data import excluded, simulate_scenario
    from edge.background import radial_stats
    from edge.spotfinding import find_peaks

    model = AnomalyModel(make_interpreter(blob), spec, Path("anomaly_int8.tflite"), 1)
    raw, gated, ys = [], [], []
    for seed in range(lo, hi):
        sf, y = simulate_scenario(seed)
        if excluded(sf):
            continue
        stats = radial_stats(sf.frame, geometry=sf.geometry)
        peaks = find_peaks(sf.frame, geometry=sf.geometry, stats=stats)
        r = model.classify(sf.frame, sf.geometry, stats=stats, peaks=peaks)  # a fresh gate per frame
        raw.append([c in r.assessment.proposed for c in model.classes])
        gated.append([c in r.flags for c in model.classes])
        ys.append(y)
    return np.array(raw, bool).reshape(-1, 6), np.array(gated, bool).reshape(-1, 6), np.array(ys).reshape(-1, 6)


def gated_eval(seeds: tuple[int, int], blob: bytes, spec: dict, *, workers: int = 2):
    """(raw flags, gated flags, labels) of the frames of a seed range."""
    lo, hi = seeds
    chunks = [(a, min(a + 50, hi), blob, spec) for a in range(lo, hi, 50)]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_gated_chunk, chunks)
    else:
        parts = [_gated_chunk(c) for c in chunks]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def export_tflite(model, rep: np.ndarray) -> bytes:
    import tensorflow as tf

    def representative():
        for row in rep:
            yield [row[None, :].astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def export_onnx(model, n_in: int, classes) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    member_outs = []
    for m, dense in enumerate(member_weights(model)):
        cur = "features"
        for k, (w, b) in enumerate(dense):
            inits += [numpy_helper.from_array(w, f"m{m}_W{k}"), numpy_helper.from_array(b, f"m{m}_B{k}")]
            nodes.append(helper.make_node("MatMul", [cur, f"m{m}_W{k}"], [f"m{m}_mm{k}"]))
            nodes.append(helper.make_node("Add", [f"m{m}_mm{k}", f"m{m}_B{k}"], [f"m{m}_z{k}"]))
            last = k == len(dense) - 1
            out = f"m{m}_p" if last else f"m{m}_h{k}"
            nodes.append(helper.make_node("Sigmoid" if last else "Relu", [f"m{m}_z{k}"], [out]))
            cur = out
        member_outs.append(cur)
    nodes.append(helper.make_node("Mean", member_outs, ["probabilities"]))
    graph = helper.make_graph(
        nodes, "anomaly_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(classes)])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="xray-edge models.train")
    m.ir_version = 8
    m.doc_string = "Frame-anomaly MLP; input: standardised, clipped features (see model_card.json)."
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def run_tflite(blob: bytes, x: np.ndarray) -> np.ndarray:
    """Dequantised probabilities of the int8 model (ai-edge-litert), one row at a time."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    it = Interpreter(model_content=blob, num_threads=1)
    it.allocate_tensors()
    ind, outd = it.get_input_details()[0], it.get_output_details()[0]
    si, zi = ind["quantization"]
    so, zo = outd["quantization"]
    out = np.empty((len(x), outd["shape"][-1]), np.float32)
    for k, row in enumerate(x):
        q = np.clip(np.round(row / si) + zi, -128, 127).astype(np.int8)
        it.set_tensor(ind["index"], q[None, :])
        it.invoke()
        out[k] = (it.get_tensor(outd["index"])[0].astype(np.float32) - zo) * so
    return out


def run_onnx(blob: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"features": x.astype(np.float32)})[0]


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("tensorflow", "tensorflow-cpu", "keras", "numpy", "numba", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
    _training_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="data-generation processes")
    ap.add_argument("--no-cache", action="store_true", help="regenerate data, do not read or write runs/")
    ap.add_argument("--out", type=Path, default=MODELS, help="output folder (default: models/)")
    ap.add_argument("--train-seeds", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                    help=f"training seed range (default {SPLITS['train'][0]} {SPLITS['train'][1]}; for trial runs)")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS}; for trial runs)")
    ap.add_argument("--members-from", type=Path, default=None, metavar="DIR",
                    help="take the (calibrated) members from a model folder (anomaly.onnx + model_card.json) "
                         "instead of training them; only the saturation head is fitted")
    ap.add_argument("--gated-seeds", type=int, nargs=2, metavar=("LO", "HI"), default=list(GATED_HELDOUT),
                    help="held-out seed range re-simulated for the gated metrics")
    args = ap.parse_args(argv)
    if args.train_seeds is not None:
        SPLITS["train"] = tuple(args.train_seeds)

    from edge import anomaly_data as AD
    from edge.anomaly_data import CLASSES, MIN_SATURATED, P_ANOMALY, P_NO_BEAM
    from edge.features import FEATURE_NAMES, N_FEATURES

    t0 = time.time()
    data = {k: dataset(k, workers=args.workers, use_cache=not args.no_cache) for k in SPLITS}
    xtr, ytr = data["train"]
    mean = xtr.mean(axis=0)
    std = xtr.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    for name in DISABLED:
        std[FEATURE_NAMES.index(name)] = DISABLED_STD
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    xs = {k: _standardise(v[0], mean, std) for k, v in data.items()}

    yv = data["validation"][1]
    member_cols = [i for i, n in enumerate(FEATURE_NAMES) if n not in HEAD_ONLY]
    member_names = [FEATURE_NAMES[i] for i in member_cols]
    head_col = FEATURE_NAMES.index(HEAD_ONLY[0])
    cls = CLASSES.index(HEAD_CLASS)
    xm = {k: v[:, member_cols] for k, v in xs.items()}
    if args.members_from is not None:
        members, from_card = load_members(args.members_from, member_names, mean[member_cols], std[member_cols])
        temps = np.array([from_card["calibration"]["temperatures"][c] for c in CLASSES])
        p_val_raw = _sigmoid(logits_np(members, xm["validation"])).mean(axis=0)
        p_held_raw = _sigmoid(logits_np(members, xm["heldout"])).mean(axis=0)
        member_source = {"from": str(args.members_from), "version": from_card.get("version"),
                         "onnx_sha256": _sha256((args.members_from / "anomaly.onnx").read_bytes()),
                         "note": "members and their temperatures as shipped there; not retrained"}
    else:
        core = train(xm["train"], ytr, xm["validation"], yv, epochs=args.epochs)
        # calibration: per-class temperature on the validation split, folded into
        # the members' output layers (so the int8 and float exports carry it)
        p_val_raw = core.predict(xm["validation"], verbose=0)
        p_held_raw = core.predict(xm["heldout"], verbose=0)
        temps = fit_temperatures(member_logits(core, xm["validation"]), yv)
        fold_temperatures(core, temps)
        members = member_weights(core)
        member_source = {"from": "trained here"}
    # the saturation head: a z + c u + d on each member's calibrated logit,
    # fitted on the validation split (the members' training-split logits are
    # overconfident, the head would learn nothing there)
    head = fit_head(logits_np(members, xm["validation"])[:, :, cls], data["validation"][0][:, head_col], yv[:, cls])
    unit = head_unit(float(mean[head_col]), float(std[head_col]))
    model = inference_model(attach_head(members, N_FEATURES, member_cols, head_col, unit, cls, head), N_FEATURES)
    p_val = model.predict(xs["validation"], verbose=0)
    thr = tune_thresholds(p_val, yv)

    tfl = export_tflite(model, xs["train"][:: max(1, len(xtr) // 1000)])
    onx = export_onnx(model, N_FEATURES, CLASSES)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "anomaly_int8.tflite").write_bytes(tfl)
    (args.out / "anomaly.onnx").write_bytes(onx)

    xh, yh = xs["heldout"], data["heldout"][1]
    p_int8 = run_tflite(tfl, xh)
    p_float = run_onnx(onx, xh)
    p_keras = model.predict(xh, verbose=0)
    f_int8, f_float = p_int8 >= thr, p_float >= thr
    m_int8, m_float = metrics(f_int8, yh, CLASSES), metrics(f_float, yh, CLASSES)
    agree = float(np.mean(f_int8 == f_float))
    agree_frames = float(np.mean((f_int8 == f_float).all(axis=1)))
    calibration = {
        "method": "per-class temperature on the members' logits, fitted on the validation split (log loss), "
                  "folded into the output layers before export; then the saturation head (see architecture)",
        "temperatures": {c: round(float(t), 4) for c, t in zip(CLASSES, temps)},
        "ece_bins": 10,
        "ece_validation": {"before": reliability(p_val_raw, yv, CLASSES), "after": reliability(p_val, yv, CLASSES)},
        "ece_heldout": {"before": reliability(p_held_raw, yh, CLASSES), "after_float": reliability(p_keras, yh, CLASSES),
                        "after_int8": reliability(p_int8, yh, CLASSES)},
    }
    gate_spec = {"classes": list(CLASSES), "thresholds": {c: float(t) for c, t in zip(CLASSES, thr)},
                 "input": {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "clip": CLIP}}
    t_gate = time.time()
    g_raw, g_flags, g_y = gated_eval(tuple(args.gated_seeds), tfl, gate_spec, workers=args.workers)
    gated = {"seeds": list(args.gated_seeds), "frames": int(len(g_y)),
             "model_flags": metrics(g_raw, g_y, CLASSES), "confirmed_flags": metrics(g_flags, g_y, CLASSES),
             "seconds": round(time.time() - t_gate, 1),
             "path": "edge.anomaly.AnomalyModel.classify (int8 model, then a fresh edge.evidence.EvidenceGate "
                     "per frame)"}

    card = {
        "name": "xray-edge frame anomaly classifier",
        "version": MODEL_VERSION,
        "task": "multi-label classification of detector-frame anomalies (sigmoid per class; no flag = normal)",
        "classes": list(CLASSES),
        "thresholds": {c: float(t) for c, t in zip(CLASSES, thr)},
        "files": {
            "tflite": {"path": "anomaly_int8.tflite", "sha256": _sha256(tfl), "bytes": len(tfl)},
            "onnx": {"path": "anomaly.onnx", "sha256": _sha256(onx), "bytes": len(onx)},
        },
        "input": {
            "features": list(FEATURE_NAMES),
            "n_features": N_FEATURES,
            "computed_by": "edge.features.frame_features(frame, geometry, stats=radial_stats, peaks=find_peaks)",
            "normalisation": "x = clip((features - mean) / std, -clip, clip), float32",
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "clip": CLIP,
            "disabled_features": list(DISABLED),
            "tflite_input": "int8, q = round(x / scale) + zero_point (scale/zero point from the tensor)",
            "onnx_input": "float32 x, name 'features', shape (batch, n_features)",
        },
        "output": {"tflite": "int8 probabilities, p = (q - zero_point) * scale", "onnx": "float32 probabilities",
                   "name": "probabilities"},
        "architecture": {"type": f"mean of {MEMBERS} independently trained MLPs", "members": MEMBERS,
                         "hidden": list(HIDDEN), "activation": "relu", "output": "sigmoid",
                         "loss": "binary cross-entropy", "optimizer": "Adam 1e-3 then 3e-4",
                         "epochs": EPOCHS, "batch": BATCH, "seed": SEED,
                         "member_inputs": f"all features but {', '.join(HEAD_ONLY)}",
                         "members_source": member_source,
                         "head": {"class": HEAD_CLASS, "input": HEAD_ONLY[0],
                                  "form": "each member's logit a z + c u + d (u: the 0/1 input), carried by one "
                                          "pass-through ReLU unit per hidden layer (hidden widths "
                                          f"{HIDDEN[0] + 1}, {HIDDEN[1] + 1} in the files); zero weights "
                                          "to and from every other unit, so the other classes are the members' own",
                                  "a": round(head[0], 4), "c": round(head[1], 4), "d": round(head[2], 4),
                                  "fitted_on": "validation split, log loss of the ensemble mean "
                                               f"(c bounded to [0, {HEAD_WEIGHT_MAX:g}])"}},
        "data": {
            "generator": "edge.anomaly_data.make_example(seed) (edge.sim + anomaly knobs)",
            "recipe_version": RECIPE_VERSION,
            "splits": {k: {"seeds": list(v), "frames": int(len(data[k][0])),
                           "excluded_seeds": int(v[1] - v[0] - len(data[k][0])),
                           "positives": {c: int(n) for c, n in zip(CLASSES, data[k][1].sum(axis=0))}}
                       for k, v in SPLITS.items()},
            "fresh_seeds_from": FRESH_SEEDS_FROM,
            "p_anomaly_each": P_ANOMALY,
            "p_no_beam": P_NO_BEAM,
            "saturation_label": f">= {MIN_SATURATED} saturated pixels with a bright 4-neighbour",
            "layouts": dict(AD.LAYOUT_SHARES),
            "background_counts_per_px": list(AD.LEVEL_RANGE),
            "labels": {
                "no_beam": "flux 0: no photons from the beam (dark counts, hot pixels, detector faults only)",
                "blank": "beam on, no crystal, scattered photons decidable from the dark counts (>= "
                         f"{AD.MIN_SCATTER_PHOTONS:g} expected photons and >= {AD.SCATTER_MIN_Z:g} sigma of the "
                         "dark counts)",
                "diffraction": f">= {AD.MIN_VISIBLE_SPOTS} visible Bragg spots: no blank/no_beam flag, whatever "
                               "the background",
            },
            "severity": {
                "ice_rings": f"3.90 A line peak {AD.MIN_ICE_RATIO}-{AD.MAX_ICE_RATIO:g} x the background under it "
                             f"and >= {AD.ICE_MIN_Z:g} Poisson sigma over the ring; width 0.8-8 px; 35 % "
                             "partial (textured arcs)",
                "beam_off_center": f"true beam {AD.MIN_OFFSET_PX:g}-150 px from the believed centre; normal frames "
                                   f"<= {AD.MAX_NORMAL_OFFSET_PX:g} px (no training frames in between); drawn only "
                                   f"with >= {AD.OFFSET_MIN_COUNTS:g} expected counts/px near the beam",
                "normal_diffraction": "50-2500 x sqrt(Mpix) spots, mean intensity background x 10-30000 within "
                                      "20-5000 counts (weak and sparse diffraction is normal)",
                "excluded": f"undecidable labels: a crystal but < {AD.MIN_VISIBLE_SPOTS} visible spots (truth SNR >= "
                            f"{AD.VISIBLE_SNR:g}); a blank whose scatter cannot be told from the dark counts; a dead "
                            f"area expected to receive < {AD.MIN_LOST_COUNTS:g} counts",
                "beam_centre": f"believed centre at the layout centre (p={AD.P_CENTRED}; module gap on a 1M) or "
                               "within +-12 % of it",
                "beamstop": "30 % small disc (6-25 px) without arm, offset up to 0.8 radius from the beam; "
                            "15 % concentric disc 10-40 px without arm; 55 % disc with a full-length arm "
                            "(random angle, or 0 degrees for a quarter of them)",
            },
        },
        "metrics_validation_keras": metrics(p_val >= thr, yv, CLASSES),
        "metrics_heldout": {"int8_tflite": m_int8, "float_onnx": m_float},
        "metrics_heldout_gated": gated,
        "calibration": calibration,
        "int8_vs_float": {
            "flag_agreement": round(agree, 5),
            "frame_agreement": round(agree_frames, 5),
            "max_abs_prob_diff": round(float(np.abs(p_int8 - p_float).max()), 4),
            "onnx_vs_keras_max_abs_diff": float(np.abs(p_float - p_keras).max()),
        },
        "command": ("python -m models.train" + (f" --members-from {args.members_from}" if args.members_from else "")
                    + "  (training venv; writes models/*; see models/README.md, Reproduce)"),
        "tool_versions": _versions(),
        "training_seconds": round(time.time() - t0, 1),
    }
    # measured outside training (the evidence gate, tests/test_real_frames.py);
    # kept with the sha256 of the model they were measured on, so a stale entry shows
    prev_path = args.out / "model_card.json"
    if prev_path.is_file():
        prev = json.loads(prev_path.read_text())
        card.update({k: prev[k] for k in ("evidence_gate", "real_frames") if k in prev})
        # replaced by metrics_heldout_gated (measured here, on this model)
        card.get("evidence_gate", {}).pop("simulated_validation_cost", None)
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print("next: python -m models.golden (runtime venv) to record the self-test outputs of the new model")
    print(json.dumps({"val_macro_f1": card["metrics_validation_keras"]["macro_f1"],
                      "val_f1": {k: v["f1"] for k, v in card["metrics_validation_keras"]["per_class"].items()},
                      "macro_f1_int8": m_int8["macro_f1"], "macro_f1_float": m_float["macro_f1"],
                      "per_class_f1_int8": {k: v["f1"] for k, v in m_int8["per_class"].items()},
                      "gated_subset_macro_f1_raw_vs_confirmed": [gated["model_flags"]["macro_f1"],
                                                                  gated["confirmed_flags"]["macro_f1"]],
                      "gated_per_class_f1": {k: v["f1"] for k, v in gated["confirmed_flags"]["per_class"].items()},
                      "ece_heldout_mean_before_after": [calibration["ece_heldout"]["before"]["mean"],
                                                        calibration["ece_heldout"]["after_int8"]["mean"]],
                      "flag_agreement": agree, "tflite_bytes": len(tfl), "thresholds": card["thresholds"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
