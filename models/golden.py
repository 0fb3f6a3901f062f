"""Golden inputs and recorded int8 outputs of the anomaly model (``models/golden.json``).

``AnomalyModel.load`` runs the model on these inputs and compares with the
recorded outputs on the machine it runs on (see ``edge.anomaly``). The file
carries the sha256 of the model it was recorded for, so it must be rewritten
whenever the model changes (``models.train`` does it at the end)::

    python -m models.golden                       # models/anomaly_int8.tflite -> models/golden.json
    python -m models.golden --model my.tflite     # -> golden.json beside my.tflite

Cases: the all-zero int8 input; the features of a few simulated frames (fresh
seeds, never used in training) covering a normal frame and every class; and a
few fixed pseudo-random int8 vectors, which drive every weight far from the
training data. The outputs are recorded with the reference kernels; every
runtime path on the recording machine must agree with them within
``TOLERANCE_LSB`` (optimised kernels round intermediate sums differently by
a few steps), or nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent
#: Allowed |output - recorded| in int8 steps (1/256 of probability each). The
#: runtime paths on x86-64 differ by at most 4 on random inputs, 0-1 on frame
#: features; the wrong outputs seen under emulation differed by up to 215.
TOLERANCE_LSB = 4
N_RANDOM = 4
SEED_OFFSET = 7000  # simulated frames: card's fresh seeds + this, onward


def frame_cases(card: dict, *, max_seeds: int = 200) -> list[tuple[str, np.ndarray]]:
    """Features of simulated frames: two normal ones and one per class, from fresh seeds."""
    from edge.anomaly_data import CLASSES, make_example

    want = {"normal": 2, **{c: 1 for c in CLASSES}}
    out = []
    seed = card["data"]["fresh_seeds_from"] + SEED_OFFSET
    for seed in range(seed, seed + max_seeds):
        ex = make_example(seed)
        if ex is None:
            continue
        feats, y = ex
        labels = [c for c, v in zip(CLASSES, y) if v > 0.5] or ["normal"]
        first = next((c for c in labels if want.get(c, 0) > 0), None)
        if first is None:
            continue
        want[first] -= 1
        out.append((f"seed {seed}: {'+'.join(labels)}", feats))
        if not any(want.values()):
            return out
    raise RuntimeError(f"no frame found in {max_seeds} seeds for {[c for c, n in want.items() if n]}")


def record(model_path: Path, *, out: Path | None = None) -> dict:
    """Record the golden cases of ``model_path`` and write them (default: golden.json beside it)."""
    from edge.anomaly import CARD_FILE, GOLDEN_FILE, RUNTIME_PATHS, AnomalyModel, make_interpreter, run_int8

    blob = model_path.read_bytes()
    card = json.loads(model_path.with_name(CARD_FILE).read_text())
    ref = make_interpreter(blob, runtime_path="reference")
    n_in = ref.get_input_details()[0]["shape"][-1]
    # the runtime's own standardisation and quantisation, on a model that is not self-tested (yet)
    unchecked = AnomalyModel(ref, card, model_path, 1)
    rng = np.random.default_rng(20261130)
    names, inputs, feats = ["all-zero int8 input"], [np.zeros(n_in, np.int8)], [None]
    for name, f in frame_cases(card):
        names.append(name)
        inputs.append(unchecked.quantize(f[None, :])[0])
        feats.append(f)
    for k in range(N_RANDOM):
        names.append(f"random int8 #{k}")
        inputs.append(rng.integers(-128, 128, n_in).astype(np.int8))
        feats.append(None)
    q = np.stack(inputs)
    outputs = run_int8(ref, q)
    spread = {}
    for name in RUNTIME_PATHS:
        got = run_int8(make_interpreter(blob, runtime_path=name), q)
        spread[name] = int(np.abs(got.astype(np.int16) - outputs).max())
    if max(spread.values()) > TOLERANCE_LSB:
        raise RuntimeError(f"runtime paths disagree by more than {TOLERANCE_LSB} LSB on this machine: {spread}")
    import ai_edge_litert

    golden = {
        "about": "golden inputs and int8 outputs of the anomaly model; AnomalyModel.load checks them on every "
                 "load. Regenerate with: python -m models.golden (whenever the model changes)",
        "model_sha256": hashlib.sha256(blob).hexdigest(),
        "tolerance_lsb": TOLERANCE_LSB,
        "recorded_with": {"runtime": f"ai-edge-litert {ai_edge_litert.__version__}", "path": "reference",
                          "machine": platform.machine(), "python": platform.python_version(),
                          "max_difference_lsb_by_path": spread},
        "cases": [{"name": n, "input_int8": x.tolist(), "output_int8": y.tolist(),
                   "features": None if f is None else [float(v) for v in f]}
                  for n, x, y, f in zip(names, q, outputs, feats)],
    }
    out = out or model_path.with_name(GOLDEN_FILE)
    out.write_text(json.dumps(golden, indent=1) + "\n")
    return golden


def main(argv: list[str] | None = None) -> int:
    from edge.anomaly import MODEL_FILE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODELS / MODEL_FILE, help="the .tflite file (card beside it)")
    ap.add_argument("--out", type=Path, default=None, help="output (default: golden.json beside the model)")
    args = ap.parse_args(argv)
    g = record(args.model, out=args.out)
    print(f"{len(g['cases'])} golden cases for {args.model.name} (sha256 {g['model_sha256'][:12]}...), "
          f"runtime paths within {g['recorded_with']['max_difference_lsb_by_path']} LSB of the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
