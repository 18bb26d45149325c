"""The institution's own checks of its settings against its data, on its host only."""

from __future__ import annotations

import pytest

from confide.client.institution import InstitutionError, check_local_privacy


def test_a_max_delta_not_below_one_over_the_declared_size_is_refused():
    with pytest.raises(InstitutionError, match=r"max_delta = 0\.01 is not below 1/100"):
        check_local_privacy(declared_examples=100, max_delta=0.01, training_examples=1000)


def test_a_max_delta_not_below_one_over_the_datas_size_is_refused_when_n_exceeds_n_declared():
    # Declared 40, holding 50: delta 0.021 < 1/40 passes the public check, not 1/50.
    with pytest.raises(InstitutionError, match=r"1/50 \(training examples\)"):
        check_local_privacy(declared_examples=40, max_delta=0.021, training_examples=50)


def test_no_declared_size_is_refused_with_what_to_set():
    with pytest.raises(InstitutionError, match=r"no declared_examples\. .*about the 108"):
        check_local_privacy(declared_examples=None, max_delta=1e-5, training_examples=108)


def test_a_declared_size_far_from_the_data_is_a_warning_not_a_refusal():
    assert check_local_privacy(declared_examples=100, max_delta=1e-5, training_examples=150) == []
    (warning,) = check_local_privacy(declared_examples=100, max_delta=1e-5, training_examples=250)
    assert "declared_examples = 100" in warning and "250 training examples" in warning
