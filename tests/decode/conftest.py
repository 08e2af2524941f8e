"""Engines on the k2-tiny checkpoint for the decode-stage tests (small pages and chunks so short
prompts still span several chunks and pages).

torch runs one intra-op thread here: the tiny model's ops are microseconds long, and on a shared
2-core box two threads per op spin against each other (10x slower steps when other tests run).
"""

import pytest
import torch

PAGE_SIZE = 16
CHUNK_SIZE = 16
NUM_PAGES = 96


@pytest.fixture(scope="package")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_engine(model_dir):
    from model import Engine

    return Engine.load(
        model_dir, kv_format="bf16", num_pages=NUM_PAGES, page_size=PAGE_SIZE, chunk_size=CHUNK_SIZE
    )


@pytest.fixture(scope="package")
def decode_engine(tiny_model_dir, one_torch_thread):
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="package")
def prefill_engine(tiny_model_dir, one_torch_thread):
    return load_engine(tiny_model_dir)
