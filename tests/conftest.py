"""Shared pytest fixtures."""

import pytest
import torch

# Engines for the stage tests: small pages and chunks so short prompts still span several.
STAGE_PAGE_SIZE = 16
STAGE_CHUNK_SIZE = 16
STAGE_NUM_PAGES = 96


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models' ops take microseconds: on a shared 2-core box two intra-op threads per op
    spin against each other (10-100x slower steps while Ray workers run), so tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _stage_engine(model_dir):
    from model import Engine

    return Engine.load(
        model_dir,
        kv_format="bf16",
        num_pages=STAGE_NUM_PAGES,
        page_size=STAGE_PAGE_SIZE,
        chunk_size=STAGE_CHUNK_SIZE,
    )


@pytest.fixture(scope="session")
def decode_engine(tiny_model_dir):
    return _stage_engine(tiny_model_dir)


@pytest.fixture(scope="session")
def prefill_engine(tiny_model_dir):
    return _stage_engine(tiny_model_dir)


# ---- generated checkpoints (model/checkpoint.py), shared by every test package ------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A seeded random ``k2-tiny`` checkpoint (bf16, sharded with an index, tokenizer files)."""
    from model.checkpoint import make_model

    return make_model("k2-tiny", tmp_path_factory.mktemp("k2-tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_model_dir(tmp_path_factory):
    """The same ``k2-tiny`` weights (same seed) stored as block-FP8, as Kimi-K2 ships them."""
    from model.checkpoint import make_model

    return make_model("k2-tiny", tmp_path_factory.mktemp("k2-tiny-fp8"), fp8=True, seed=0)


@pytest.fixture(scope="session")
def dsv3_tiny_model_dir(tmp_path_factory):
    """A ``dsv3-tiny`` checkpoint: model_type deepseek_v3 with grouped routing (4 groups, top-2)."""
    from model.checkpoint import make_model

    return make_model("dsv3-tiny", tmp_path_factory.mktemp("dsv3-tiny"), seed=0)


# ---- ray_session (added by the scheduler helper; shared by every test that needs Ray) --------
@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
