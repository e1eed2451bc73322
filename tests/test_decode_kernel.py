"""The fused latent decode: dispatch rules, the glue around the kernel, and (in a subprocess under
Triton's interpreter) the kernel itself. No GPU needed."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mla_pass.kernels.decode_attention import DecodeKernelConfig, _plan, decode_attention, decode_attention_reference
from mla_pass.kernels.dispatch import absorbed_decode, first_attended, fused_absorbed, kernel_refusal
from mla_pass.math.attention import absorbed_attention
from mla_pass.rewrite import CacheMask

CASES = Path(__file__).parent / "interpreter" / "decode_kernel_cases.py"


def _run_kernel_cases(where: str, **env_changes: str) -> None:
    """Runs the kernel's cases in a fresh process (TRITON_INTERPRET must be set or unset before
    triton is imported, which this shared process cannot promise); every case must run and pass."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'mla-pass[triton]'): the kernel is not tested")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLA_PASS_KERNEL_DEVICE")}
    env.update(env_changes, PYTHONHASHSEED="0")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                         cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"kernel cases ({where}) failed ({summary}):\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"skipped|deselected|error", summary), \
        f"expected every kernel case ({where}) to run and pass, got: {summary}"


def test_kernel_under_triton_interpreter():
    _run_kernel_cases("Triton interpreter, CPU", TRITON_INTERPRET="1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the compiled kernel runs only on one "
                    "(the same cases run under the interpreter above)")
def test_kernel_on_gpu():
    _run_kernel_cases("compiled, CUDA", MLA_PASS_KERNEL_DEVICE="cuda")


def _decode_inputs(dtype=torch.float32, seed=0, b=3, h=6, hkv=2, n=12, r=4, v=16, c=24, t=37):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    kv_heads = [i // (h // hkv) for i in range(h)]
    attention_mask = torch.ones(b, t - 1, dtype=torch.long)
    attention_mask[1, :5] = attention_mask[2, :30] = 0                      # left padding
    mask = CacheMask()(torch.cat([attention_mask, attention_mask.new_ones(b, 1)], 1), torch.zeros(b, 1))
    return dict(q_nope=rnd(b, h, 1, n), q_rope=rnd(b, h, 1, r), latent=rnd(b, t, c), k_rope=rnd(b, 1, t, r),
                up_k=rnd(hkv, n, c), up_v=rnd(hkv, v, c), b_v=rnd(hkv, v), b_k=rnd(hkv, n),
                key_scale=(torch.rand(b, hkv, t, generator=g) + 0.5).to(dtype), kv=torch.tensor(kv_heads),
                kv_heads=kv_heads, mask=mask)


@pytest.mark.parametrize("softcap", [None, 8.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_glue_around_the_kernel_contract(softcap, with_bias):
    """W_ukᵀ q → (kernel contract, here its PyTorch reference) → W_uv equals ``absorbed_attention``
    on a decode-step mask from ``CacheMask`` with left padding: the glue the GPU path runs."""
    d = _decode_inputs()
    b_k, ks = (d["b_k"], d["key_scale"]) if with_bias else (None, None)
    args = (d["q_nope"], d["q_rope"], d["latent"], d["k_rope"], d["up_k"], d["up_v"], d["b_v"], d["kv"])
    ref = absorbed_attention(*args, 0.3, d["mask"], False, softcap, b_k, ks)
    for mask in (d["mask"], torch.where(d["mask"], 0.0, float("-inf"))):   # bool and additive
        out = fused_absorbed(*args, d["kv_heads"], 0.3, mask, softcap, b_k, ks, impl=decode_attention_reference)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"mask {mask.dtype}: max |fused glue − absorbed_attention| = {err:.3g} > 1e-5"


def test_first_attended_position_of_a_left_padded_mask():
    mask = _decode_inputs()["mask"]                       # rows padded by 0, 5 and 30 positions
    start = first_attended(mask)
    assert start.tolist() == [0, 5, 30] and start.dtype == torch.int32
    assert first_attended(mask) is start                  # the next layers of the same step reuse it
    mask[0, ..., :3] = False                              # an in-place change is seen
    assert first_attended(mask).tolist() == [3, 5, 30]
    empty = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    assert first_attended(empty).tolist() == [0, 0]       # nothing to attend: the kernel's mask gives NaN


def test_cpu_decode_is_the_pytorch_path():
    d = _decode_inputs()
    args = (d["q_nope"], d["q_rope"], d["latent"], d["k_rope"], d["up_k"], d["up_v"], d["b_v"], d["kv"], 0.3, d["mask"])
    assert kernel_refusal(d["q_nope"], d["latent"], d["mask"], False) == "tensors on cpu, the kernel needs CUDA"
    got = absorbed_decode(*args, kv_heads=d["kv_heads"])
    from mla_pass.math.absorbed_mqa import absorbed_attention_mqa, eligible
    if eligible(None, None, d["kv_heads"], d["up_k"].shape[0]):   # plain softmax: the multi-query form
        assert torch.equal(got, absorbed_attention_mqa(*args))
    # two fp32 orderings of the same sums (the GPU machine's BLAS gave 1.05e-5 at 1e-5)
    assert (got - absorbed_attention(*args)).abs().max() <= 5e-5


def test_refusal_reasons():
    d = _decode_inputs()
    q, lat, mask = d["q_nope"], d["latent"], d["mask"]
    b, t = lat.shape[:2]
    assert "2 queries" in kernel_refusal(q.expand(-1, -1, 2, -1), lat, None, False)
    assert "is_causal" in kernel_refusal(q, lat, None, True)
    assert "mask of shape" in kernel_refusal(q, lat, mask.expand(b, 6, 1, t), False)      # per-head mask
    assert "mask of shape" in kernel_refusal(q, lat, mask[..., :-1], False)
    assert "mask dtype" in kernel_refusal(q, lat, mask.long(), False)
    assert "latent dtype" in kernel_refusal(q, lat.double(), mask, False)
    up = d["up_k"].clone().requires_grad_()
    assert "autograd" in kernel_refusal(q, lat, mask, False, up)
    with torch.no_grad():
        assert "needs CUDA" in kernel_refusal(q, lat, mask, False, up)
    assert "needs CUDA" in kernel_refusal(q, lat, mask[:1], False)                        # one row for the batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: these refusals come after the device check")
def test_refusal_where_the_kernel_does_not_pay():
    q = torch.zeros(1, 32, 1, 64, device="cuda")
    small, wide = torch.zeros(1, 1000, 512, device="cuda"), torch.zeros(1, 1000, 2048, device="cuda")
    assert "MiB of cache" in kernel_refusal(q, small, None, False)
    assert "latent width 2048" in kernel_refusal(q, wide, None, False)
    assert kernel_refusal(q, torch.zeros(1, 65536, 512, device="cuda"), None, False) is None   # 128 MiB


def test_plan_defaults():
    smol = _plan(DecodeKernelConfig(), 1, 9, 16384, 24, 8, tuple(i // 3 for i in range(9)), sm_count=132)
    assert (smol.block_h, smol.c_chunk, smol.n_chunks, smol.rspan, smol.head_blocks) == (16, 32, 1, 16, 1)
    assert smol.num_splits == 64                        # batch 1: one program per split, 2 per SM (capped)
    llama = _plan(DecodeKernelConfig(), 16, 32, 4096, 2048, 16, tuple(range(32)), sm_count=132)
    assert (llama.block_h, llama.c_chunk, llama.n_chunks, llama.block_t, llama.rspan) == (32, 256, 8, 32, 16)
    assert llama.num_splits == 3                        # 16 × 8 programs per split
    short = _plan(DecodeKernelConfig(), 1, 9, 100, 24, 0, tuple(i // 3 for i in range(9)), sm_count=132)
    assert short.num_splits == 1 and short.rspan == 0   # ≥ 4 tiles per split; no rope keys
    fixed = _plan(DecodeKernelConfig(num_splits=5, block_h=16, c_chunk=64), 2, 32, 100, 96, 8, tuple(range(32)), 132)
    assert (fixed.num_splits, fixed.head_blocks, fixed.n_chunks, fixed.rspan) == (5, 2, 2, 16)
    d32 = _plan(DecodeKernelConfig(), 1, 9, 65536, 96, 8, tuple(i // 3 for i in range(9)), sm_count=132)
    assert (d32.c_chunk, d32.n_chunks, d32.num_splits) == (32, 3, 64)   # narrow latents: 32-wide output programs


def test_out_of_shared_memory_shrinks_the_tiling(monkeypatch):
    """When the GPU refuses a tiling (triton's OutOfResources at launch), the kernel retries with
    fewer stages, then shorter T tiles, then narrower latent chunks, and remembers what fitted."""
    triton = pytest.importorskip("triton", reason="triton is not installed: no kernel to launch")
    from triton.runtime.errors import OutOfResources

    da = importlib.import_module("mla_pass.kernels.decode_attention")     # the module, not the function
    tried = []

    def launch(K, cfg, plan, *args):
        tried.append((cfg.num_stages, plan.block_t, plan.c_chunk))
        if plan.block_t > 16:                           # pretend only 16-token tiles fit
            raise OutOfResources(300_000, 232_448, "shared memory")
        return torch.zeros(1)

    monkeypatch.setattr(da, "_launch", launch)
    monkeypatch.setattr(da, "_SHRUNK", {})
    import mla_pass.kernels._triton_decode as K
    monkeypatch.setattr(K, "INTERPRETED", True)         # CPU tensors pass the device check; nothing launches
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 9, 24, generator=g), torch.randn(1, 9, 8, generator=g), torch.randn(1, 64, 24, generator=g),
            torch.randn(1, 1, 64, 8, generator=g), 0.3)
    decode_attention(*args, config=DecodeKernelConfig(num_stages=3))
    assert tried == [(3, 64, 32), (1, 64, 32), (1, 32, 32), (1, 16, 32)]
    tried.clear()
    decode_attention(*args, config=DecodeKernelConfig(num_stages=3))
    assert tried == [(1, 16, 32)]                       # remembered per shape and requested config
    assert da._shrink(DecodeKernelConfig(num_stages=1, block_t=16, c_chunk=16), da._plan(
        DecodeKernelConfig(num_stages=1, block_t=16, c_chunk=16), 1, 9, 64, 24, 8, (0,) * 9, 1)) is None


def test_bad_input_messages():
    with pytest.raises(ValueError, match="power of two"):
        DecodeKernelConfig(block_t=24)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeKernelConfig(num_splits=0)
    q, qr, lat, rk = torch.zeros(2, 4, 24), torch.zeros(2, 4, 8), torch.zeros(2, 10, 24), torch.zeros(2, 1, 10, 8)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        decode_attention(q, qr, lat[:, :, :16], rk, 0.1)
    with pytest.raises(ValueError, match="kv_head_of_query"):
        decode_attention(q, qr, lat, rk, 0.1, kv_head_of_query=[0, 1, 2, 0], key_scale_BHkvT=torch.ones(2, 2, 10))
    with pytest.raises(ValueError, match=r"shared: \[B,1,T,R\]"):
        decode_attention(q, qr, lat, torch.zeros(2, 2, 10, 8), 0.1)
    with pytest.raises(ValueError, match="lengths must have shape"):
        decode_attention(q, qr, lat, rk, 0.1, torch.tensor([3]))
    with pytest.raises(ValueError, match="3 kv heads"):
        decode_attention(q, qr, lat, rk, 0.1, key_scale_BHkvT=torch.ones(2, 3, 10))


def test_cpu_path_never_imports_triton():
    code = ("import sys, mla_pass.modules.latent_attention, mla_pass.kernels; "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real benchmark")
def test_gpu_benchmark_without_cuda_says_so():
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_decode.py"
    proc = subprocess.run([sys.executable, str(script), "--no-smoke"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU numbers were measured" in proc.stdout and "|" not in proc.stdout, proc.stdout
