"""The LoRA launches as an H100 would get them, checked on CPU (benchmarks/sm90_resources.py):
the flags of each launch of a training step, and, compiled for sm_90 by the installed Triton's
compiler and ptxas (no GPU needed), that the tuner's 128 x 256 Hopper tiles hold the rank-r
epilogue within the H100's shared memory and without spilling registers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import sm90_resources as sm90


def _flags(launch):
    return launch[2]


def _compiled_report(*options):
    """benchmarks.sm90_resources --json with these options, in a fresh process: Triton compiles only
    without its interpreter, which CI runs under."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "benchmarks.sm90_resources", "--json", *options],
                         env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_split_schedule_launches_and_flags():
    u, fwd, g, grad_x, grad_A, grad_B = sm90.record_lora_launches(512, 256, 384, 16)
    # u = s * x A^T and g = s * grad_y B: skinny launches that write the scaled, bf16 rank-r tile.
    for skinny in (u, g):
        assert _flags(skinny)["ACC_SCALE"] and not _flags(skinny)["LR_EPILOGUE"]
        assert skinny[1][2].dtype == torch.bfloat16  # out
    # The GEMMs read it back by descriptor: B stored [N, r] for the forward, A stored [r, K] for grad_x.
    for big, q_rmajor in ((fwd, True), (grad_x, False)):
        flags = _flags(big)
        assert flags["LR_PRECOMPUTED"] and flags["LR_DESC"] and flags["EVEN_R"] and flags["USE_DESC"]
        assert flags["Q_RMAJOR"] is q_rmajor and not flags["ACC_SCALE"]
    assert _flags(fwd)["W_KMAJOR"] and not _flags(grad_x)["W_KMAJOR"]
    assert not _flags(grad_A)["COLSUM"] and not _flags(grad_B)["COLSUM"]  # no bias here
    assert grad_A[5] is None and grad_B[5] is None  # fixed tiles, not tuned


def test_fused_schedule_at_decode_size():
    fwd, grad_x, grad_A, grad_B = sm90.record_lora_launches(16, 256, 384, 16)
    for launch in (fwd, grad_x):
        assert _flags(launch)["IN_LOOP_LR"] and _flags(launch)["SAVE_LR"] and not _flags(launch)["LR_PRECOMPUTED"]


def test_rank_100_pads_the_rank_tile():
    launches = sm90.record_lora_launches(512, 256, 384, 100)
    fwd = launches[1]
    assert _flags(fwd)["BLOCK_R"] == 128 and not _flags(fwd)["EVEN_R"]


@pytest.mark.parametrize("r", [16, 64])
def test_hopper_tiles_hold_the_lowrank_epilogue(r):
    """At least one 3-stage 128 x 256 x 64 candidate of the forward and of grad_x compiles for sm_90
    within the H100's 227 KB of shared memory, with no register spills (the TMA epilogue adds its
    lr / q tiles to the main loop's 3 stages)."""
    rows = _compiled_report("--rank", str(r), "--launches", "forward,grad_x", "--block-n", "256", "--stages", "3")
    assert [row["launch"] for row in rows] == ["forward", "grad_x"]
    for row in rows:
        assert row["flags"]["LR_DESC"] and row["flags"]["BLOCK_R"] == r
        fits = [c for c in row["configs"] if "error" not in c and c["shared"] <= sm90.H100_SHARED_LIMIT
                and c["stack"] == 0]
        assert len(row["configs"]) == 2 and fits, row


from fusedpeft._kernels import triton_kernels  # noqa: E402

launch = triton_kernels.launch


def _rescale_flags(kind, dtype):
    return [launch[2] for launch in sm90.record_rescale_launches(512, 256, 384, kind, dtype)]


def test_register_scaled_loops_are_pipelined_for_16_bit_only():
    """Input scaling's forward and output scaling's grad_x scale their a tile in registers: per-tile
    K loops (not flattened, which ptxas serialises) for 16-bit inputs on 128-row tiles; the
    serialised flattened loop for fp32 and for 64-row tiles, where Triton 3.6's pipelined loop
    races (register_operand_hazards)."""
    for dtype, flatten in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True)):
        fwd_ff, grad_ff = _rescale_flags("ia3-ff", dtype)
        fwd_out, grad_out = _rescale_flags("ia3-out", dtype)
        for flags in (fwd_ff, grad_out):
            assert flags["SCALE_A"] and flags["FLATTEN"] is flatten, (dtype, flags)
            assert launch.config_constexprs(flags, {"BLOCK_M": 64}, dtype.itemsize)["FLATTEN"]
        for flags in (grad_ff, fwd_out):  # no register scaling: flattened as every other launch
            assert not flags["SCALE_A"] and flags["FLATTEN"]
        assert grad_ff["REDUCE_AUX"] and grad_ff["AUX_DESC"] and fwd_out["SAVE_AUX"] and fwd_out["AUX_DESC"]


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


def test_register_operand_hazard_check():
    """The checker flags a write to a wgmma's register A operand while the wgmma may still read it
    (here across the loop's back edge: R152's wgmma is still pending at the top), and passes the
    same loop when the write goes elsewhere or a full wait comes first."""
    racy = sm90.register_operand_hazards(_RS_LOOP.format(write="LDSM.16.M88.4 R152, [R186+0x28000]"))
    assert racy and all("R152" in line for line in racy), racy
    assert sm90.register_operand_hazards(_RS_LOOP.format(write="LDSM.16.M88.4 R4, [R186+0x28000]")) == []
    waited = _RS_LOOP.format(write="WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n        /*0118*/   LDSM.16.M88.4 R152, [R186]")
    assert sm90.register_operand_hazards(waited) == []


# Large M: the 3-stage 128 x 256 configs, bf16 and fp32. M <= 64: every candidate of the tuner
# (16- to 64-row tiles), bf16, where the 64-row one-warpgroup tiles raced before they were kept on
# the serialised loop.
@pytest.mark.parametrize("method,launch,shape,dtypes,filters", [
    ("ia3-ff", "forward", "512x512x512", ("bf16", "fp32"), ("--block-n", "256", "--stages", "3")),
    ("ia3-out", "grad_x", "512x512x512", ("bf16", "fp32"), ("--block-n", "256", "--stages", "3")),
    ("ia3-ff", "forward", "48x512x512", ("bf16",), ()),
])
def test_register_scaled_loops_compile_without_hazards(method, launch, shape, dtypes, filters):
    """The register-scaled loops, compiled for sm_90 by the installed Triton: no wgmma register
    operand overwritten while its wgmma is in flight; and on the 128-row bf16 tiles no ptxas
    serialisation of the wgmmas (the loss the per-tile loop removed)."""
    for dtype in dtypes:
        (row,) = _compiled_report("--method", method, "--dtype", dtype, "--shape", shape, "--launches", launch,
                                  *filters)
        compiled = [c for c in row["configs"] if "error" not in c]
        assert compiled, row
        for c in compiled:
            assert c["hazards"] == [], (dtype, c)
            if dtype == "bf16" and c["config"]["BLOCK_M"] >= 128:
                assert not any("serialized" in a for a in c["advisories"]), c
