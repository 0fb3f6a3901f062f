"""Record the shipped model's results on the shared real frames in the model card.

``python -m models.real_frames [FOLDER]`` (runtime venv; default folder
``shared/real_frames`` beside the checkout, as the tests find it) runs every frame through the
int8 model and the evidence gate, as ``edge run`` does, and writes the
card's ``real_frames`` entry: the model's own flags, the confirmed flags, the
two highest probabilities and the beam evidence, with the sha256 of the model
it was measured on. ``tests/test_real_frames.py`` checks the entry against
live results, so it cannot go stale silently. The frames are never used for
training or for choosing a threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent
# beside the checkout (/work/main -> /work/shared) or one level up for a worktree
DEFAULT_FOLDER = next((p / "shared" / "real_frames" for p in MODELS.parents[1:3] if (p / "shared").is_dir()),
                      MODELS.parents[1] / "shared" / "real_frames")

#: File -> what a crystallographer calls it (the test's expectations).
LABELS = {
    "thau_3_2_0002.cbf.bz2": "strong hit",
    "thau_3_2_0008.cbf.bz2": "strong hit",
    "thau_3_2_0014.cbf.bz2": "weak hit",
    "thau_3_2_0019.cbf.bz2": "blank",
    "eiger16m_therm_0001.cbf.gz": "sparse photon-counting frame with diffraction",
}


def evaluate(folder: Path) -> dict:
    """The card's ``real_frames`` ``frames`` entries for the frames in ``folder``."""
    import fabio
    import numpy as np

    from edge import Geometry, find_peaks, radial_stats
    from edge.anomaly import AnomalyModel

    model = AnomalyModel.load()
    out = {}
    for name in LABELS:
        img = fabio.open(str(folder / name))
        frame = np.asarray(img.data)
        geom = Geometry.from_cbf_header(img.header["_array_data.header_contents"], frame.shape)
        stats = radial_stats(frame, geometry=geom)
        peaks = find_peaks(frame, geometry=geom, stats=stats)
        r = model.classify(frame, geom, stats=stats, peaks=peaks)
        top = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[:2]
        entry = {"label": LABELS[name], "model_flags": list(r.assessment.proposed), "flags": list(r.flags),
                 "top": {c: round(float(p), 3) for c, p in top}}
        beam = r.assessment.evidence.get("blank") or r.assessment.evidence.get("no_beam")
        if beam:
            entry["evidence"] = {k: beam[k] for k in ("verdict", "clear_peaks", "background_counts_per_px",
                                                      "scatter_ratio", "scatter_z") if k in beam}
        out[name] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER, help="folder of the real frames")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"real frames not found: {args.folder}", file=sys.stderr)
        return 2
    card_path = MODELS / "model_card.json"
    card = json.loads(card_path.read_text())
    entry = card.setdefault("real_frames", {})
    entry["model_sha256"] = card["files"]["tflite"]["sha256"]
    entry["frames"] = evaluate(args.folder)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(entry["frames"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
