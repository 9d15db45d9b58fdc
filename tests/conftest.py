import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(n)``: a Ctrl-C (KeyboardInterrupt) at the n-th training step of the
    fits that follow."""
    import spfa.data

    def arm(at):
        calls = []
        original = spfa.data.RowBatches.step_terms

        def step_terms(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(spfa.data.RowBatches, "step_terms", step_terms)

    return arm
