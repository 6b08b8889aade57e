import pytest

from tests.helpers import make_teachers


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session; the pipeline reuses an initialised Ray."""
    import os

    import ray

    from orchestrator.pipeline import RAY_ENV

    os.environ.update(RAY_ENV)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    return make_teachers(tmp_path_factory.mktemp("teachers"))
