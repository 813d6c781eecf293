"""Every error path of the CUDA extension's binding, each in a fresh process with faulthandler on:
each must end in a RuntimeError naming the argument, never kill the process (GPU).

    python -m tools.bgmv_errors
"""
import subprocess
import sys

CASES = {
    "update_bad_scalings": "ext.lora_update_(torch.addmm(b, x, W.T), x, A, B, s.double(), r, i)",
    "linear_x_on_cpu": "ext.lora_linear(x.cpu(), W, b, A, B, s, r, i, False)",
    "linear_bad_weight_bias": "ext.lora_linear(x, W[:, :5], b, A, B, s, r, i, False)",
    "linear_bad_weight_nobias": "ext.lora_linear(x, W[:, :5], None, A, B, s, r, i, False)",
    "update_A_2d": "ext.lora_update_(torch.addmm(b, x, W.T), x, A[0], B, s, r, i)",
    "linear_A_2d": "ext.lora_linear(x, W, b, A[0], B, s, r, i, False)",
    "expand_u_3d": "ext.expand_(torch.addmm(b, x, W.T), torch.zeros(5, 8, 1, device=d), B, s, r, i)",
    "linear_bad_bias": "ext.lora_linear(x, W, b[:3], A, B, s, r, i, False)",
    "linear_bad_scalings": "ext.lora_linear(x, W, b, A, B, s.double(), r, i, False)",
    "linear_ok": "print(ext.lora_linear(x, W, b, A, B, s, r, i, False).shape)",
    "linear_ok_nobias": "print(ext.lora_linear(x, W, None, A, B, s, r, i, True).shape)",
}
PRE = """
import faulthandler, torch; faulthandler.enable()
from fusedpeft import _cuda_ext
ext = _cuda_ext.load()
d = 'cuda'; bf = torch.bfloat16
x = torch.randn(5, 96, device=d, dtype=bf); W = torch.randn(64, 96, device=d, dtype=bf); b = torch.randn(64, device=d, dtype=bf)
A = torch.randn(2, 8, 96, device=d, dtype=bf); B = torch.randn(2, 64, 8, device=d, dtype=bf)
s = torch.ones(2, device=d); r = torch.tensor([8, 4], dtype=torch.int32, device=d); i = torch.tensor([0, 1, -1, 0, 1], dtype=torch.int32, device=d)
try:
    {call}
except RuntimeError as e:
    print('RuntimeError:', str(e).splitlines()[0][:160])
"""

def main():
    for name, call in CASES.items():
        run = subprocess.run([sys.executable, "-c", PRE.replace("{call}", call)], capture_output=True, text=True,
                             timeout=120, check=False)
        tail = run.stderr.strip()[-600:] if run.returncode else ""
        print(f"{name}: rc={run.returncode} {run.stdout.strip()[-200:]} {tail}")


if __name__ == "__main__":
    main()
