"""A run of the suite under another transformers (see `transformers_matrix.py`) checks that it really loaded it."""

import os

import transformers


def pytest_sessionstart(session) -> None:
    expected = os.environ.get("ENGRAM_HF_EXPECT_TRANSFORMERS")
    if expected is not None and transformers.__version__ != expected:
        raise RuntimeError(f"expected transformers {expected}, imported {transformers.__version__}")
