"""Shared pytest fixtures."""

import pytest


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
