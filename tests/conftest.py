import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter. It must be switched on before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


_CONTEXT_LOST = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if HAS_CUDA and call.excinfo is not None:
        from fusedpeft import tuning

        if tuning.device_fault(call.excinfo.value):
            item.stash[_CONTEXT_LOST] = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    # A CUDA fault (an illegal address, say) is sticky: every later test of this process would fail
    # at setup, and a pytest-xdist worker takes a test after another as fast as they fail. Under
    # xdist the worker ends here, its failure reported; xdist starts a fresh one for the tests left.
    if item.stash.get(_CONTEXT_LOST, False) and os.environ.get("PYTEST_XDIST_WORKER"):
        os._exit(70)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A new seed every run (printed on failure through the test id's log) so inputs are random each
    # time, yet a failure can be replayed with FUSEDPEFT_TEST_SEED.
    seed = int(os.environ.get("FUSEDPEFT_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    print(f"seed={seed}")
    yield


@pytest.fixture(scope="module")
def one_thread():
    # For modules of tiny tensors: one thread is fastest, and immune to a busy machine's thread pool.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def use_settings():
    """use_settings(name=value, ...) holds fusedpeft.settings.override(...) until the test ends."""
    import contextlib

    import fusedpeft

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(fusedpeft.settings.override(**changes))
