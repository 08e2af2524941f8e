"""Shared pytest fixtures."""

# ---- ray_session (added by the scheduler helper; shared by every test that needs Ray) --------
import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
