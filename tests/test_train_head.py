"""The saturation head of ``models.train`` (NumPy parts; no TensorFlow needed).

The shipped model is the v7 members plus a head that carries one 0/1 input
to the saturation logit through a pass-through unit per hidden layer; these
tests pin what that construction promises: the other classes' logits are the
members' own, bit for bit, and the head's logit is ``a z + c u + d``.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import train as T


def _members(rng, n_in, h=(7, 5), n_out=6, m=3):
    out = []
    for _ in range(m):
        dims = (n_in, *h, n_out)
        out.append([(rng.normal(size=(a, b)).astype(np.float32), rng.normal(size=b).astype(np.float32))
                    for a, b in zip(dims[:-1], dims[1:])])
    return out


@pytest.mark.parametrize("mean_u", [0.02, 0.3, 0.9])
def test_attach_head_keeps_other_classes_and_adds_the_head_term(mean_u):
    rng = np.random.default_rng(1)
    n_member, head_col, cls = 9, 9, 1
    members = _members(rng, n_member)
    u = (rng.random(200) < mean_u).astype(np.float32)
    x = rng.normal(size=(200, n_member + 1)).astype(np.float32)
    std_u = float(u.std()) or 1.0
    x[:, head_col] = np.clip((u - u.mean()) / std_u, -T.CLIP, T.CLIP)  # as the runtime standardises it
    head = (0.8, 11.0, -1.5)
    wide = T.attach_head(members, n_member + 1, list(range(n_member)), head_col,
                         T.head_unit(float(u.mean()), std_u), cls, head)
    z_old = T.logits_np(members, x[:, :n_member])
    z_new = T.logits_np(wide, x)
    other = [c for c in range(6) if c != cls]
    np.testing.assert_array_equal(z_new[:, :, other], z_old[:, :, other])
    np.testing.assert_allclose(z_new[:, :, cls], head[0] * z_old[:, :, cls] + head[1] * u + head[2],
                               rtol=1e-5, atol=1e-4)


def test_head_unit_refuses_an_input_without_variance():
    with pytest.raises(SystemExit, match="no variance"):
        T.head_unit(1.0, 1e30)  # a disabled column standardises 0 and 1 alike


def test_fit_head_recovers_a_known_head():
    rng = np.random.default_rng(2)
    n = 6000
    z = rng.normal(0.0, 3.0, size=(5, n)) + rng.normal(0.0, 0.3, size=(5, n))
    u = (rng.random(n) < 0.2).astype(np.float64)
    a, c, d = 0.7, 3.0, -1.0
    p = T._sigmoid(a * z + c * u + d).mean(axis=0)
    y = (rng.random(n) < p).astype(np.float32)
    fa, fc, fd = T.fit_head(z, u, y)
    assert abs(fa - a) < 0.1 and abs(fc - c) < 0.5 and abs(fd - d) < 0.3, (fa, fc, fd)


def test_fit_head_stops_at_the_bound_when_the_input_implies_the_label():
    rng = np.random.default_rng(3)
    z = rng.normal(-2.0, 2.0, size=(5, 800))
    u = (rng.random(800) < 0.1).astype(np.float64)
    y = ((u > 0) | (z.mean(axis=0) > 1.0)).astype(np.float32)  # u = 1 always positive
    a, c, d = T.fit_head(z, u, y)
    assert c == T.HEAD_WEIGHT_MAX


def test_shipped_model_routes_the_head_input_to_saturation_only():
    """In the shipped float model, ``overload_core`` reaches only the
    saturation logit, through one pass-through unit per hidden layer, and no
    other input reaches those units (so the other classes are the members')."""
    import json

    import onnx
    from onnx import numpy_helper

    from edge.anomaly_data import CLASSES
    from edge.features import FEATURE_NAMES

    card = json.loads((T.MODELS / "model_card.json").read_text())
    head = card["architecture"]["head"]
    j = FEATURE_NAMES.index(head["input"])
    cls = CLASSES.index(head["class"])
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(T.MODELS / "anomaly.onnx")).graph.initializer}
    for m in range(card["architecture"]["members"]):
        w0, w1, w2 = init[f"m{m}_W0"], init[f"m{m}_W1"], init[f"m{m}_W2"]
        assert w0.shape[1] == T.HIDDEN[0] + 1 and w1.shape[1] == T.HIDDEN[1] + 1
        assert not w0[j, :-1].any() and w0[j, -1] > 0  # the input feeds only its unit
        assert not np.delete(w0[:, -1], j).any()       # and nothing else feeds that unit
        assert not w1[-1, :-1].any() and not w1[:-1, -1].any() and w1[-1, -1] == 1.0
        assert not np.delete(w2[-1], cls).any()        # the unit reaches the head's class only
        assert abs(w2[-1, cls] - head["c"]) < 1e-3
