"""`python -m sspo_jax.parity_demo`: the model against transformers on a tiny random model, as a command."""
import numpy as np
import pytest

from sspo_jax import parity_demo


def test_left_padded_batch_layout():
    ids, mask = parity_demo.left_padded([3, 1], vocab=10)
    assert ids.shape == mask.shape == (2, 3) and ids.dtype == np.int32
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert (ids[mask == 0] == 0).all() and ((ids[mask == 1] >= 1) & (ids[mask == 1] < 10)).all()


def test_main_fails_when_a_check_exceeds_its_tolerance(monkeypatch, capsys):
    monkeypatch.setattr(parity_demo, "run_checks", lambda: [("a", 1e-6, 1e-5), ("b", 2.0, 1.0)])
    assert parity_demo.main() == 1
    assert "| b | 2.00e+00 | 1 | NO |" in capsys.readouterr().out


@pytest.mark.slow  # builds, loads and compiles a 3-layer model four ways: ~25 s of CPU
def test_demo_passes_on_a_fresh_random_model(capsys):
    assert parity_demo.main() == 0
    out = capsys.readouterr().out
    assert "parity OK" in out and "KV-cache greedy decode" in out
