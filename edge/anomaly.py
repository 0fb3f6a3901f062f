"""Frame-anomaly classifier runtime: the shipped int8 TFLite model on frame features.

Classes (multi-label; no flag = normal frame), see ``models/model_card.json``:
``ice_rings``, ``saturation``, ``blank``, ``no_beam``, ``beam_off_center``,
``detector_fault``.

Typical use (load once, classify every frame)::

    from edge.anomaly import AnomalyModel
    model = AnomalyModel.load()                    # models/anomaly_int8.tflite
    model.warmup()                                 # compile feature kernels now
    stats = edge.radial_stats(frame, geometry=g)   # the pipeline has these anyway
    peaks = edge.find_peaks(frame, geometry=g, stats=stats)
    result = model.classify(frame, g, stats=stats, peaks=peaks)
    if result.flags: ...

The interpreter comes from ``ai_edge_litert`` (fallback ``tflite_runtime``);
tensors are allocated once at load. Loading runs a self-test: the model on the
golden inputs of ``models/golden.json`` must reproduce the recorded int8
outputs on this machine. If the default runtime path (with the XNNPACK
delegate) does not, the runtime paths without it are tried and the first that
matches is used, with a warning; if none matches, loading fails with
:class:`ModelSelfTestError`, so no command can come from a model that is wrong
on this CPU (QEMU's "max" CPU with SVE/SME made XNNPACK return wrong outputs
without any error). Inputs are standardised with the card's
mean/std, clipped, and quantised with the input tensor's scale and zero point;
outputs are dequantised with the output tensor's.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .features import N_FEATURES, FeatureError, frame_features
from .geometry import Geometry

__all__ = ["AnomalyModel", "AnomalyResult", "AnomalyError", "AnomalyInputError", "ModelFileError",
           "ModelSelfTestError", "SelfTest", "default_model_path", "RUNTIME_PATHS"]

MODEL_FILE = "anomaly_int8.tflite"
CARD_FILE = "model_card.json"
GOLDEN_FILE = "golden.json"

#: TFLite runtime paths, in the order the self-test tries them: name ->
#: ``OpResolverType`` member. "default" applies the XNNPACK delegate;
#: "builtin" the optimised built-in kernels without it; "reference" the
#: plain reference kernels (slowest, simplest; still microseconds here).
RUNTIME_PATHS = {"default": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


class AnomalyError(ValueError):
    """Base class of the anomaly runtime's errors."""


class AnomalyInputError(AnomalyError):
    """Features or frame unusable: wrong shape or dtype, NaN/inf, geometry mismatch."""


class ModelFileError(AnomalyError):
    """Model, card or golden file missing, unreadable, corrupt, or not matching the model's sha256."""


class ModelSelfTestError(AnomalyError):
    """The model does not reproduce its golden outputs on this machine with any runtime path."""


def default_model_path() -> Path:
    """Path of the shipped model inside the installed ``models`` package."""
    import models

    return Path(models.__file__).resolve().parent / MODEL_FILE


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelFileError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)") from exc
    return interpreter


def _interpreter_class():
    return _interpreter_module().Interpreter


def make_interpreter(blob: bytes, *, num_threads: int = 1, runtime_path: str = "default"):
    """A TFLite interpreter for model bytes on one of :data:`RUNTIME_PATHS`, tensors allocated.

    Raises
    ------
    ModelFileError
        The bytes are not a TFLite model the runtime accepts.
    """
    mod = _interpreter_module()
    resolver = getattr(mod.OpResolverType, RUNTIME_PATHS[runtime_path])
    try:
        it = mod.Interpreter(model_content=blob, num_threads=int(num_threads),
                             experimental_op_resolver_type=resolver)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"not a valid TFLite model: {exc}") from None
    return it


def run_int8(interpreter, q: np.ndarray) -> np.ndarray:
    """Raw int8 outputs (n, n_out) of an allocated interpreter for int8 inputs (n, n_in), one row at a time."""
    ind, outd = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    q = np.asarray(q, np.int8).reshape(-1, ind["shape"][-1])
    out = np.empty((len(q), outd["shape"][-1]), np.int8)
    for k in range(len(q)):
        interpreter.set_tensor(ind["index"], q[k:k + 1])
        interpreter.invoke()
        out[k] = interpreter.get_tensor(outd["index"])[0]
    return out


def load_golden(path: str | Path, *, model_sha256: str) -> dict:
    """Read a golden file (``python -m models.golden`` writes it) and check it belongs to the model.

    Returns
    -------
    dict
        ``inputs`` int8 (n, n_in), ``outputs`` int8 (n, n_out), ``names``, ``tolerance_lsb``,
        ``features`` float32 (m, n_in) with ``feature_rows`` (their rows in ``inputs``).

    Raises
    ------
    ModelFileError
        Missing, unreadable or malformed, or recorded for another model file.
    """
    path = Path(path)
    try:
        g = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"golden file not found: {path} (the model cannot be self-tested; "
                             "write it with: python -m models.golden --model MODEL.tflite)") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"golden file {path} is unreadable: {exc}") from None
    try:
        if g["model_sha256"] != model_sha256:
            raise ModelFileError(f"golden file {path} was recorded for model sha256 {g['model_sha256'][:12]}..., "
                                 f"this model is {model_sha256[:12]}...: re-run python -m models.golden "
                                 "after changing the model")
        cases = g["cases"]
        inputs = np.array([c["input_int8"] for c in cases], dtype=np.int64)
        outputs = np.array([c["output_int8"] for c in cases], dtype=np.int64)
        feats = [(k, c["features"]) for k, c in enumerate(cases) if c.get("features") is not None]
        out = {"names": [str(c["name"]) for c in cases], "tolerance_lsb": int(g["tolerance_lsb"]),
               "features": np.array([f for _, f in feats], dtype=np.float32).reshape(len(feats), -1),
               "feature_rows": [k for k, _ in feats]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"golden file {path} is malformed: {exc!r}") from None
    if (not len(cases) or inputs.ndim != 2 or outputs.ndim != 2 or inputs.min() < -128 or inputs.max() > 127
            or outputs.min() < -128 or outputs.max() > 127 or not 0 <= out["tolerance_lsb"] <= 8):
        raise ModelFileError(f"golden file {path} is malformed: need int8 inputs and outputs, "
                             "one row per case, and tolerance_lsb in 0..8")
    out["inputs"], out["outputs"] = inputs.astype(np.int8), outputs.astype(np.int8)
    return out


@dataclass(frozen=True)
class SelfTest:
    """Outcome of the load-time self-test.

    Attributes
    ----------
    runtime_path : str
        The :data:`RUNTIME_PATHS` entry in use (the first that reproduced the golden outputs).
    cases : int
        Golden cases checked; ``tolerance_lsb`` the allowed difference in int8 output steps.
    failed : dict of str -> str
        Runtime paths tried before ``runtime_path`` that failed, with what they got wrong.
    """

    runtime_path: str
    cases: int
    tolerance_lsb: int
    failed: dict

    def summary(self) -> str:
        """One line for logs and ``edge info``."""
        s = (f"passed ({self.cases} golden inputs, within {self.tolerance_lsb} LSB) on the "
             f"'{self.runtime_path}' runtime path")
        if self.failed:
            s += "; FAILED on " + "; ".join(f"'{k}': {v}" for k, v in self.failed.items())
        return s


@dataclass(frozen=True)
class AnomalyResult:
    """Classification of one frame.

    Attributes
    ----------
    probabilities : dict of str -> float
        Per-class probability in [0, 1] (classes as in the model card).
    flags : tuple of str
        From :meth:`AnomalyModel.predict`: classes whose probability reaches
        the card's threshold. From :meth:`AnomalyModel.classify`: those
        proposals confirmed by the frame's evidence, plus flags the evidence
        raises alone (:mod:`edge.evidence`); empty = normal.
    raw : ndarray of float32, shape (n_classes,)
        The probabilities in class order.
    assessment : edge.evidence.Assessment or None
        The confirmation step (proposals, unconfirmed ones, evidence with
        units); None from :meth:`AnomalyModel.predict`.
    """

    probabilities: dict
    flags: tuple
    raw: np.ndarray = field(repr=False)
    assessment: object = field(default=None, repr=False)

    @property
    def normal(self) -> bool:
        """True when no anomaly is flagged."""
        return not self.flags


class AnomalyModel:
    """The int8 TFLite anomaly classifier with its model card.

    Use :meth:`load`; the constructor is internal.

    Attributes
    ----------
    classes : tuple of str
    thresholds : ndarray of float64, shape (n_classes,)
        Flag a class when its probability >= threshold.
    card : dict
        The parsed model card.
    path : Path
        The .tflite file.
    """

    def __init__(self, interpreter, card: dict, path: Path, num_threads: int, self_test: SelfTest | None = None):
        self._it = interpreter
        self.self_test = self_test  # None only for the golden-file recorder (models.golden)
        self.runtime_path = self_test.runtime_path if self_test else None
        self.card = card
        self.path = path
        self.num_threads = num_threads
        self.classes = tuple(card["classes"])
        self.thresholds = np.array([card["thresholds"][c] for c in self.classes], dtype=np.float64)
        spec = card["input"]
        self._mean = np.asarray(spec["mean"], dtype=np.float32)
        self._std = np.asarray(spec["std"], dtype=np.float32)
        self._clip = np.float32(spec["clip"])
        ind = interpreter.get_input_details()[0]
        outd = interpreter.get_output_details()[0]
        self._in_index, self._out_index = ind["index"], outd["index"]
        self._in_scale, self._in_zero = (float(v) for v in ind["quantization"])
        self._out_scale, self._out_zero = (float(v) for v in outd["quantization"])
        self._buf = np.zeros((1, N_FEATURES), dtype=np.int8)
        self._lock = threading.Lock()  # a TFLite interpreter is not thread-safe

    # -- loading ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, card: str | Path | dict | None = None,
             golden: str | Path | None = None, num_threads: int = 1) -> "AnomalyModel":
        """Load the model and its card, verify the sha256, allocate tensors, self-test.

        Parameters
        ----------
        path : str or Path, optional
            The .tflite file; default the shipped ``models/anomaly_int8.tflite``.
        card : str, Path or dict, optional
            Model card; default ``model_card.json`` beside ``path``.
        golden : str or Path, optional
            Golden inputs and recorded outputs; default ``golden.json`` beside ``path``.
        num_threads : int
            Interpreter threads (1 keeps the latency predictable on a small board).

        Raises
        ------
        ModelFileError
            Missing/unreadable/corrupt model, card or golden file, sha256
            mismatch, or a model whose tensors do not match the card.
        ModelSelfTestError
            No runtime path reproduces the golden outputs on this machine.
        """
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        path = Path(path) if path is not None else default_model_path()
        if not path.is_file():
            raise ModelFileError(f"anomaly model not found: {path}")
        if not isinstance(card, dict):
            card_path = Path(card) if card is not None else path.with_name(CARD_FILE)
            try:
                card = json.loads(card_path.read_text())
            except FileNotFoundError:
                raise ModelFileError(f"model card not found: {card_path}") from None
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"model card {card_path} is unreadable: {exc}") from None
        try:
            want = card["files"]["tflite"]["sha256"]
            classes = card["classes"]
            [card["thresholds"][c] for c in classes]
            if len(card["input"]["mean"]) != N_FEATURES or len(card["input"]["std"]) != N_FEATURES:
                raise ModelFileError(f"model card expects {len(card['input']['mean'])} features, "
                                     f"edge.features makes {N_FEATURES}")
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"model card is missing a field: {exc}") from None
        blob = path.read_bytes()
        got = hashlib.sha256(blob).hexdigest()
        if got != want:
            raise ModelFileError(f"sha256 of {path} is {got}, the model card says {want}: "
                                 "the model file is corrupt or does not belong to this card")
        try:
            it = make_interpreter(blob, num_threads=num_threads)
        except ModelFileError as exc:
            raise ModelFileError(f"{path} is {exc}") from None
        ind, outd = it.get_input_details(), it.get_output_details()
        if (len(ind) != 1 or len(outd) != 1 or tuple(ind[0]["shape"]) != (1, N_FEATURES)
                or tuple(outd[0]["shape"]) != (1, len(classes))
                or ind[0]["dtype"] != np.int8 or outd[0]["dtype"] != np.int8):
            raise ModelFileError(f"{path}: expected int8 input (1, {N_FEATURES}) and int8 output "
                                 f"(1, {len(classes)}), got {[(d['shape'], d['dtype']) for d in ind + outd]}")
        gold = load_golden(golden if golden is not None else path.with_name(GOLDEN_FILE), model_sha256=got)
        model = cls(it, card, path, int(num_threads))
        model._self_test(blob, gold)
        return model

    def _self_test(self, blob: bytes, gold: dict) -> None:
        """Pick the first runtime path that reproduces the golden outputs, or raise."""
        tol = gold["tolerance_lsb"]
        rows = gold["feature_rows"]
        if rows:  # the NumPy standardisation and quantisation, on this machine
            dq = np.abs(self.quantize(gold["features"]).astype(np.int16) - gold["inputs"][rows])
            if dq.max() > 1:
                k = int(np.argmax(dq.max(axis=1)))
                raise ModelSelfTestError(
                    f"anomaly model self-test FAILED: quantising golden features '{gold['names'][rows[k]]}' "
                    f"is off by {int(dq.max())} steps on this machine; refusing to flag anything")
        failed = {}
        for name in RUNTIME_PATHS:
            it = self._it if name == "default" else make_interpreter(blob, num_threads=self.num_threads,
                                                                     runtime_path=name)
            got = run_int8(it, gold["inputs"]).astype(np.int16)
            diff = np.abs(got - gold["outputs"])
            if diff.max() <= tol:
                break
            k = int(np.argmax(diff.max(axis=1)))
            failed[name] = (f"golden input '{gold['names'][k]}' gave {got[k].tolist()}, recorded "
                            f"{gold['outputs'][k].tolist()} ({int((diff.max(axis=1) > tol).sum())} of "
                            f"{len(diff)} inputs off by more than {tol} LSB)")
        else:
            raise ModelSelfTestError(
                "anomaly model self-test FAILED on this machine: the TFLite runtime does not reproduce the "
                "model's recorded outputs on any runtime path, so its flags cannot be trusted; refusing to "
                f"flag anything (no command will come from it). {'; '.join(f'{k}: {v}' for k, v in failed.items())}")
        with self._lock:
            self._it = it
            ind, outd = it.get_input_details()[0], it.get_output_details()[0]
            self._in_index, self._out_index = ind["index"], outd["index"]
        self.self_test = SelfTest(name, len(gold["names"]), tol, failed)
        self.runtime_path = name
        if failed:
            msg = (f"anomaly model self-test: the default TFLite path (XNNPACK) gives WRONG outputs on this CPU; "
                   f"using the '{name}' path, which reproduces all {len(gold['names'])} golden outputs. "
                   + self.self_test.summary())
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- inference ----------------------------------------------------------------
    def quantize(self, features: np.ndarray) -> np.ndarray:
        """Standardised, clipped, int8-quantised model input for a (n, N_FEATURES) array."""
        x = np.clip((np.asarray(features, np.float32) - self._mean) / self._std, -self._clip, self._clip)
        return np.clip(np.round(x / self._in_scale) + self._in_zero, -128, 127).astype(np.int8)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities (n, n_classes) float32 for features (N_FEATURES,) or (n, N_FEATURES)."""
        f = self._check_features(features)
        q = self.quantize(f)
        out = np.empty((len(q), len(self.classes)), dtype=np.float32)
        with self._lock:
            for k in range(len(q)):
                self._buf[0] = q[k]
                self._it.set_tensor(self._in_index, self._buf)
                self._it.invoke()
                out[k] = self._it.get_tensor(self._out_index)[0]
        return (out - np.float32(self._out_zero)) * np.float32(self._out_scale)

    def predict(self, features: np.ndarray) -> AnomalyResult:
        """Classify one feature vector (:func:`edge.features.frame_features`).

        Raises
        ------
        AnomalyInputError
            Not shape (N_FEATURES,) (or (1, N_FEATURES)), not real numbers, or NaN/inf.
        """
        f = np.asarray(features)
        if f.ndim == 2 and f.shape[0] != 1:
            raise AnomalyInputError(f"predict takes one feature vector, got shape {f.shape}; "
                                    "use predict_proba for batches")
        p = self.predict_proba(f.reshape(1, -1) if f.ndim == 1 else f)[0]
        return self._result(p)

    def classify(self, frame: np.ndarray, geometry: Geometry, *, stats=None, peaks=None, gate=None) -> AnomalyResult:
        """Features of ``frame``, :meth:`predict`, then the evidence check.

        The model's flags are proposals: only those the frame's physical
        evidence confirms are returned as ``flags`` (see
        :class:`edge.evidence.EvidenceGate`); the rest stay probabilities.

        Parameters
        ----------
        frame : ndarray, shape (rows, columns)
            Raw counts (negative values = masked).
        geometry : Geometry
            The geometry the instrument believes (beam centre, mask, saturation).
        stats, peaks : optional
            :func:`edge.radial_stats` and :func:`edge.find_peaks` results of this
            frame, reused when given (computed otherwise).
        gate : edge.evidence.EvidenceGate, optional
            The gate of this stream (it remembers recent background levels);
            default a fresh one.

        Raises
        ------
        AnomalyInputError
            Wrong frame shape/dtype, NaN/inf on valid pixels, geometry mismatch.
        """
        from .background import radial_stats
        from .evidence import EvidenceGate
        from .spotfinding import find_peaks

        if not isinstance(geometry, Geometry):
            raise AnomalyInputError(f"geometry must be an edge.Geometry, got {type(geometry).__name__}")
        try:
            if stats is None:
                stats = radial_stats(frame, geometry=geometry)
            if peaks is None:
                peaks = find_peaks(frame, geometry=geometry, stats=stats)
            f = frame_features(frame, geometry, stats=stats, peaks=peaks)
        except (FeatureError, ValueError) as exc:
            raise AnomalyInputError(str(exc)) from exc
        res = self.predict(f)
        gate = EvidenceGate() if gate is None else gate
        a = gate(res.probabilities, res.flags, frame, geometry, stats=stats, peaks=peaks, features=f)
        return AnomalyResult(res.probabilities, a.flags, res.raw, a)

    def warmup(self) -> None:
        """Compile the feature kernels and run one inference (call at start-up)."""
        from .features import warmup

        warmup()
        self.predict(np.zeros(N_FEATURES, np.float32))

    # -- helpers ------------------------------------------------------------------
    def _result(self, p: np.ndarray) -> AnomalyResult:
        flags = tuple(c for c, v, t in zip(self.classes, p, self.thresholds) if v >= t)
        return AnomalyResult({c: float(v) for c, v in zip(self.classes, p)}, flags, p)

    @staticmethod
    def _check_features(features) -> np.ndarray:
        f = np.asarray(features)
        if f.dtype.kind not in "fiu":
            raise AnomalyInputError(f"features must be real numbers, got dtype {f.dtype}")
        if f.ndim == 1:
            f = f[None, :]
        if f.ndim != 2 or f.shape[1] != N_FEATURES:
            raise AnomalyInputError(f"features must have shape ({N_FEATURES},) or (n, {N_FEATURES}), "
                                    f"got {np.shape(features)}")
        if not np.isfinite(f).all():
            raise AnomalyInputError("features contain NaN or inf")
        return f
