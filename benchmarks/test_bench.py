"""pytest-benchmark entries over the same cases as `python -m benchmarks.lora` and
`python -m benchmarks.rescale` (GPU only):
    python -m pytest benchmarks/test_bench.py -m cuda --benchmark-only"""
import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU", allow_module_level=True)

from benchmarks import lora, rescale  # noqa: E402

CASES = {(c.group, c.variant): c for c in lora.cases(4096, 4096, 4096, 16, with_peft=False)}
for _method in rescale.METHODS:
    CASES.update({(c.group, c.variant): c for c in rescale.cases(4096, 4096, 4096, _method, with_peft=False)})


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_case(benchmark, key, mode):
    fwd, step = CASES[key].make()
    fn = fwd if mode == "fwd" else step

    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark(run)
