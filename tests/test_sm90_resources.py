"""The LoRA, IA3 and SSF launches as an H100 would get them, checked on CPU through
tools/sm90_resources.py, run as a command: the flags of each launch of a training step, and,
compiled for sm_90 by the installed Triton's compiler and ptxas (no GPU needed), that the tuner's
128 x 256 Hopper tiles hold the rank-r epilogue within the H100's shared memory and without
spilling registers, and that the register-scaled loops compile without wgmma hazards."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _tool(*options):
    """tools.sm90_resources --json with these options, in a fresh process, its report parsed.
    TRITON_INTERPRET is dropped: Triton compiles only without its interpreter, which CI runs under."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "tools.sm90_resources", "--json", *options],
                         env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded():
    """Every launch the flag tests look at, recorded in one run of the tool (nothing compiled):
    {(shape, method, rank, dtype): [row, ...]}."""
    rows = _tool("--flags-only", "--shape", "512x256x384,16x256x384,48x256x384", "--method", "lora,ia3-ff,ia3-out",
                 "--rank", "16,100", "--dtype", "bf16,fp16,fp32")
    out = {}
    for row in rows:
        out.setdefault((row["shape"], row["method"], row["rank"], row["dtype"]), []).append(row)
    return out


def _flags(launch):
    return launch["flags"]


def test_split_schedule_launches_and_flags(recorded):
    launches = recorded[("512x256x384", "lora", 16, "bf16")]
    assert [row["launch"] for row in launches] == ["u", "forward", "g", "grad_x", "grad_A", "grad_B"]
    u, fwd, g, grad_x, grad_A, grad_B = launches
    # u = s * x A^T and g = s * grad_y B: skinny launches that write the scaled, bf16 rank-r tile.
    for skinny in (u, g):
        assert skinny["kernel"] == "lowrank_product_kernel" and skinny["tensors"]["out_ptr"] == "bf16"
    assert _flags(u)["W_KMAJOR"] and not _flags(g)["W_KMAJOR"]  # A as stored; B^T as a view of B
    # The GEMMs read it back by descriptor: B stored [N, r] for the forward, A stored [r, K] for grad_x.
    assert fwd["kernel"] == "lora_forward_kernel" and grad_x["kernel"] == "lora_grad_x_kernel"
    assert not _flags(fwd)["U_IN_LOOP"] and _flags(fwd)["B_RMAJOR"]
    assert not _flags(grad_x)["G_IN_LOOP"] and not _flags(grad_x)["A_RMAJOR"]
    for big in (fwd, grad_x):
        flags = _flags(big)
        assert flags["LR_DESC"] and flags["EVEN_R"] and flags["USE_DESC"]
    assert _flags(fwd)["W_KMAJOR"] and not _flags(grad_x)["W_KMAJOR"]
    assert not _flags(grad_A)["COLSUM"] and not _flags(grad_B)["COLSUM"]  # no bias here
    assert not grad_A["tuned"] and not grad_B["tuned"]  # fixed tiles


def test_fused_schedule_at_decode_size(recorded):
    launches = recorded[("16x256x384", "lora", 16, "bf16")]
    assert [row["launch"] for row in launches] == ["forward", "grad_x", "grad_A", "grad_B"]
    fwd, grad_x = launches[:2]
    assert _flags(fwd)["U_IN_LOOP"] and _flags(grad_x)["G_IN_LOOP"]
    assert not _flags(fwd)["FLATTEN"] and not _flags(grad_x)["FLATTEN"]  # the row-block branch


def test_rank_100_pads_the_rank_tile(recorded):
    fwd = recorded[("512x256x384", "lora", 100, "bf16")][1]
    assert fwd["launch"] == "forward"
    assert _flags(fwd)["BLOCK_R"] == 128 and not _flags(fwd)["EVEN_R"]


@pytest.mark.parametrize("r", [16, 64])
def test_hopper_tiles_hold_the_lowrank_epilogue(r):
    """At least one 3-stage 128 x 256 x 64 candidate of the forward and of grad_x compiles for sm_90
    within the H100's 227 KB of shared memory, with no register spills (the TMA epilogue adds its
    lr / q tiles to the main loop's 3 stages)."""
    rows = _tool("--rank", str(r), "--launches", "forward,grad_x", "--block-n", "256", "--stages", "3")
    assert [row["launch"] for row in rows] == ["forward", "grad_x"]
    for row in rows:
        assert row["flags"]["LR_DESC"] and row["flags"]["BLOCK_R"] == r
        fits = [c for c in row["configs"] if "error" not in c and not c["over_shared_limit"] and c["stack"] == 0]
        assert len(row["configs"]) == 2 and fits, row


def test_register_scaled_loops_are_pipelined_for_16_bit_only(recorded):
    """Input scaling's forward and output scaling's grad_x scale their a tile in registers: per-tile
    K loops (not flattened, which ptxas serialises) for 16-bit inputs on 128-row tiles; the
    serialised flattened loop for fp32 and for 64-row tiles, where Triton 3.6's pipelined loop
    races (register_operand_hazards)."""
    for dtype, flatten in (("bf16", False), ("fp16", False), ("fp32", True)):
        fwd_ff, grad_ff = recorded[("512x256x384", "ia3-ff", None, dtype)]
        fwd_out, grad_out = recorded[("512x256x384", "ia3-out", None, dtype)]
        for row in (fwd_ff, grad_out):
            assert _flags(row)["SCALE_INPUT"] and _flags(row)["FLATTEN"] is flatten, (dtype, row)
        for row in (grad_ff, fwd_out):  # no register scaling: flattened as every other launch
            assert not _flags(row).get("SCALE_INPUT") and _flags(row)["FLATTEN"]
        # descriptors for 16-bit operands only (layout.descriptor_ok)
        assert grad_ff["kernel"] == "rescale_reduce_kernel" and _flags(grad_ff)["OTHER_DESC"] is (dtype != "fp32")
        assert fwd_out["kernel"] == "rescale_kernel" and _flags(fwd_out)["SAVE_Z"]
        assert _flags(fwd_out)["Z_DESC"] is (dtype != "fp32")
        # M <= 64: the tuner's 16- to 64-row candidates, each on the flattened loop.
        small = [recorded[("48x256x384", kind, None, dtype)][i] for kind, i in (("ia3-ff", 0), ("ia3-out", 1))]
        for row in small:
            assert _flags(row)["SCALE_INPUT"], row
            assert any(c["config"]["BLOCK_M"] == 64 for c in row["configs"]), row
            assert all(c["FLATTEN"] for c in row["configs"]), (dtype, row)


_RS_LOOP = """
        /*0100*/                   LDSM.16.M88.4 R164, [R180+0x28000] ;
        /*0110*/                   {write} ;
        /*0130*/                   WARPGROUP.ARRIVE ;
        /*0140*/                   HGMMA.64x256x16.F32.BF16 R24, R164, gdesc[UR16], R24, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0158*/                   HMUL2.BF16_V2 R152, R4, R18 ;
        /*0160*/                   HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR16], R24, gsb0 ;
        /*0170*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0180*/               @P3 BRA 0x100 ;
"""


def test_register_operand_hazard_check(tmp_path):
    """The checker flags a write to a wgmma's register A operand while the wgmma may still read it
    (here across the loop's back edge: R152's wgmma is still pending at the top), and passes the
    same loop when the write goes elsewhere or a full wait comes first."""
    listings = {
        "racy": _RS_LOOP.format(write="LDSM.16.M88.4 R152, [R186+0x28000]"),
        "elsewhere": _RS_LOOP.format(write="LDSM.16.M88.4 R4, [R186+0x28000]"),
        "waited": _RS_LOOP.format(write="WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n        /*0118*/   LDSM.16.M88.4 R152, [R186]"),
    }
    for name, text in listings.items():
        (tmp_path / f"{name}.sass").write_text(text)
    found = _tool("--sass", *(str(tmp_path / f"{name}.sass") for name in listings))
    racy = found[str(tmp_path / "racy.sass")]
    assert racy and all("R152" in line for line in racy), racy
    assert found[str(tmp_path / "elsewhere.sass")] == []
    assert found[str(tmp_path / "waited.sass")] == []


# Large M: the 3-stage 128 x 256 configs, bf16 and fp32. M <= 64: every candidate of the tuner
# (16- to 64-row tiles), bf16, where the 64-row one-warpgroup tiles would race on the pipelined
# loop and so take the serialised one.
@pytest.mark.parametrize("method,launch,shape,dtypes,filters", [
    ("ia3-ff", "forward", "512x512x512", ("bf16", "fp32"), ("--block-n", "256", "--stages", "3")),
    ("ia3-out", "grad_x", "512x512x512", ("bf16", "fp32"), ("--block-n", "256", "--stages", "3")),
    ("ia3-ff", "forward", "48x512x512", ("bf16",), ()),
])
def test_register_scaled_loops_compile_without_hazards(method, launch, shape, dtypes, filters):
    """The register-scaled loops, compiled for sm_90 by the installed Triton: no wgmma register
    operand overwritten while its wgmma is in flight; and on the 128-row bf16 tiles no ptxas
    serialisation of the wgmmas (the loss the per-tile loop avoids)."""
    rows = _tool("--method", method, "--dtype", ",".join(dtypes), "--shape", shape, "--launches", launch, *filters)
    assert [row["dtype"] for row in rows] == list(dtypes)
    for row in rows:
        compiled = [c for c in row["configs"] if "error" not in c]
        assert compiled, row
        for c in compiled:
            assert c["hazards"] == [], (row["dtype"], c)
            if row["dtype"] == "bf16" and c["config"]["BLOCK_M"] >= 128:
                assert not any("serialized" in a for a in c["advisories"]), c


def test_dora_magnitude_gradient_launches():
    """DoRA at p = 0: in save mode the magnitude's sums come from column_dot over the saved z; in
    recompute mode from dora_magnitude_grad_kernel, a tuned GEMM whose epilogue reads u_s and B by
    descriptor and grad_y as the reduction's other operand, and no column_dot (z never formed)."""
    rows = _tool("--flags-only", "--shape", "512x256x384", "--method", "dora", "--rank", "16")
    saved = [row["kernel"] for row in rows]
    assert "column_dot_kernel" in saved and "dora_magnitude_grad_kernel" not in saved
    rows = _tool("--flags-only", "--recompute", "--shape", "512x256x384", "--method", "dora", "--rank", "16")
    kernels = [row["kernel"] for row in rows]
    assert "column_dot_kernel" not in kernels and kernels.count("dora_magnitude_grad_kernel") == 1
    (grad_m,) = [row for row in rows if row["kernel"] == "dora_magnitude_grad_kernel"]
    flags = _flags(grad_m)
    assert grad_m["tuned"] and flags["SUM_G"] and flags["LR_DESC"] and flags["USE_DESC"] and flags["G_DESC"]
    assert grad_m["tensors"]["partial_ptr"] == "fp32" and grad_m["tensors"]["g_ptr"] == "bf16"


def test_dora_magnitude_gradient_compiles_for_sm90_within_shared_memory():
    """The recompute kernel under the tuner's Hopper tiles at r = 64 (the largest epilogue the
    model rows use): within the H100's shared memory, no spill, no wgmma hazard."""
    rows = _tool("--recompute", "--shape", "8192x4096x4096", "--method", "dora", "--rank", "64", "--launches",
                 "dora_magnitude_grad_kernel", "--block-n", "256", "--stages", "2")
    (row,) = rows
    assert row["configs"], row
    for cfg in row["configs"]:
        assert "error" not in cfg, cfg
        assert not cfg["over_shared_limit"] and cfg["stack"] == 0 and not cfg["hazards"], cfg
