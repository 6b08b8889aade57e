from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import make_teachers


@contextmanager
def local_ray():
    """A real local Ray in this process; commands run meanwhile (cli.main) use it instead of
    starting and stopping their own (orchestrator/session.py reuses an initialised Ray)."""
    import os

    import ray

    from orchestrator.pipeline import RAY_ENV

    os.environ.update(RAY_ENV)
    # Workers inherit the driver's environment: teachers given as `module: tests....` import.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray per test module (a process joins one cluster at a time, and the
    multi-node tests bring their own); the pipeline reuses an initialised Ray."""
    with local_ray():
        yield


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    return make_teachers(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def gen_setup(tmp_path_factory):
    """tests/helpers_gen.py's tokenizer, two instruction teachers and data (training the teachers
    took 2-4 s per module measured alone, 50 s on a busy machine): built once per session,
    read-only for the modules that use it."""
    from tests.helpers_gen import make_gen_setup

    return make_gen_setup(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="session")
def lm_setup(tmp_path_factory):
    """tests/helpers_lm.py's tokenizer, two trained LM teachers, student config and text files
    (training the teachers: ~10 s on 2 idle cores): built once per session, read-only for the
    modules that use it (test_lm, test_lm_instruct)."""
    from tests.helpers_lm import make_lm_setup

    return make_lm_setup(tmp_path_factory.mktemp("lm"))


def pytest_runtest_logreport(report):
    """A failure's traceback as soon as it happens, not only in the end summary: a CI run stopped
    by its time limit then still shows why a test failed (it once showed only the F)."""
    if report.failed:
        import sys

        where = f"{report.nodeid} ({report.when})"
        print(f"\n---- FAILED {where} ----\n{report.longreprtext}\n---- end of {where} ----", file=sys.stderr, flush=True)
