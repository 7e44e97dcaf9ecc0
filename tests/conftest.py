import os

import pandas as pd
import pytest
import torch

# Without a GPU, Triton kernels (ipylora/engine/gemv.py) run in Triton's CPU interpreter. It is
# chosen when triton is first imported (its own library functions are decorated then), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import CONCEPTS


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/ never leaks between tests."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fresh_session(monkeypatch):
    """A new kernel-wide Session for this test (the module global is restored afterwards)."""
    from ipylora.engine import session as session_module

    monkeypatch.setattr(session_module, "_session", None)
    yield session_module.get_session()


@pytest.fixture(scope="session")
def concepts() -> pd.DataFrame:
    return pd.read_csv(CONCEPTS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from ipylora.engine.models import load_tokenizer
    from ipylora.engine.tiny import tiny_model_path

    return load_tokenizer(str(tiny_model_path()))
