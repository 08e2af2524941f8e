"""Engines on the k2-tiny checkpoint for the decode-stage tests (small pages and chunks so short
prompts still span several chunks and pages)."""

import pytest
import torch

PAGE_SIZE = 16
CHUNK_SIZE = 16
NUM_PAGES = 96


def load_engine(model_dir):
    from model import Engine

    return Engine.load(
        model_dir,
        dtype=torch.float32,
        kv_format="bf16",
        num_pages=NUM_PAGES,
        page_size=PAGE_SIZE,
        chunk_size=CHUNK_SIZE,
    )


@pytest.fixture(scope="package")
def decode_engine(tiny_model_dir):
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="package")
def prefill_engine(tiny_model_dir):
    return load_engine(tiny_model_dir)
