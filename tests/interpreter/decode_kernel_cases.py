"""The Triton decode kernel against the PyTorch reference: under Triton's interpreter on CPU tensors,
or compiled on a CUDA GPU.

Not collected by a plain ``pytest`` run: ``tests/test_decode_kernel.py`` runs this file in a
subprocess, with ``TRITON_INTERPRET=1`` (it must be set before triton is imported, which a shared
test process cannot promise) and, when CUDA is present, once more without it on the GPU. By hand:
``TRITON_INTERPRET=1 pytest -q tests/interpreter/decode_kernel_cases.py`` (CPU) or
``MLA_PASS_KERNEL_DEVICE=cuda pytest -q tests/interpreter/decode_kernel_cases.py`` (GPU).
Tolerances compare against fp32 math on the same (rounded) inputs: the kernel rounds the
probabilities to the cache dtype before the p·latent product, as flash attention does.
"""
import os

import pytest
import torch

ON_GPU = os.environ.get("MLA_PASS_KERNEL_DEVICE") == "cuda"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # effective only if triton is not imported yet
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'mla-pass[triton]')")
from mla_pass.kernels import _triton_decode  # noqa: E402
from mla_pass.kernels.decode_attention import DecodeKernelConfig, decode_attention, decode_attention_reference
from mla_pass.kernels.dispatch import fused_absorbed  # noqa: E402
from mla_pass.math.attention import absorbed_attention  # noqa: E402

if ON_GPU:
    if _triton_decode.INTERPRETED or not torch.cuda.is_available():
        pytest.skip("MLA_PASS_KERNEL_DEVICE=cuda needs a CUDA GPU and TRITON_INTERPRET unset", allow_module_level=True)
elif not _triton_decode.INTERPRETED:
    pytest.skip("triton was imported without TRITON_INTERPRET=1: run through tests/test_decode_kernel.py",
                allow_module_level=True)
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

torch.set_num_threads(1)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def make(b, h, hkv, c, r, t, dtype, seed=0, t_max=None):
    """Random q/cache; the caches are views into larger preallocated buffers, like a real cache."""
    g = torch.Generator().manual_seed(seed)
    t_max = t_max or t + 5
    q = torch.randn(b, h, c, generator=g).to(dtype)
    qr = torch.randn(b, h, r, generator=g).to(dtype)
    lat = torch.randn(b, t_max, c, generator=g).to(dtype)[:, :t]
    rk = torch.randn(b, 1, t_max, r, generator=g).to(dtype)[:, :, :t]
    return on(q, qr, lat, rk)


def on(*tensors):
    """The tensors on the device under test (made on CPU, so both devices see the same numbers)."""
    return tuple(t.to(DEVICE) for t in tensors)


def check(out, ref, dtype, what):
    err = (out.float() - ref.float()).abs().max().item()
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert err <= TOL[dtype], f"{what}: max |kernel − reference| = {err:.3g} > {TOL[dtype]:.1g}"


# pairwise cover of c × 2r × g (every pair of values appears), dtypes and tilings rotating
SHAPES = [(c, r, (1, 3, 8)[(i + j) % 3]) for i, c in enumerate((24, 48, 96, 512)) for j, r in enumerate((0, 8, 16))]


@pytest.mark.parametrize("k", range(len(SHAPES)), ids=[f"c{c}-2r{r}-g{g}" for c, r, g in SHAPES])
def test_shapes_ragged(k):
    c, r, g = SHAPES[k]
    dtype = (torch.float32, torch.float16, torch.bfloat16)[k % 3]
    hkv = 2 if g < 8 else 3
    b, h, t = 3, hkv * g, 45                    # T not a multiple of the 16-wide tiles
    cfg = DecodeKernelConfig(num_splits=(1, 3)[k % 2], block_t=16,
                             block_h=16 if h > 16 else None,                  # several head blocks
                             c_chunk=(None, max(16, 1 << (c // 3).bit_length() - 1))[(k // 2) % 2])   # several latent chunks
    q, qr, lat, rk = make(b, h, hkv, c, r, t, dtype, seed=k)
    lengths, start = on(torch.tensor([45, 30, 17]), torch.tensor([0, 4, 9]))     # right-ragged and left-padded
    scale = c ** -0.5
    out = decode_attention(q, qr, lat, rk, scale, lengths, start_B=start, config=cfg)
    ref = decode_attention_reference(q, qr, lat, rk, scale, lengths, start_B=start)
    check(out, ref, dtype, f"c={c} 2r={r} g={g} {dtype} {cfg}")


@pytest.mark.parametrize("splits", [1, 2, 5, 8])
def test_split_k(splits):
    """Long and short sequences in one batch: some splits of the short one are empty."""
    q, qr, lat, rk = make(2, 6, 2, 48, 8, 150, torch.float32, seed=splits)
    lengths, = on(torch.tensor([150, 20]))
    cfg = DecodeKernelConfig(num_splits=splits, block_t=16)
    out = decode_attention(q, qr, lat, rk, 0.2, lengths, config=cfg)
    check(out, decode_attention_reference(q, qr, lat, rk, 0.2, lengths), torch.float32, f"{splits} splits")


@pytest.mark.parametrize("splits", [1, 3])
def test_masks(splits):
    """A bool key mask with holes and whole padding tiles (skipped), and an additive float mask."""
    q, qr, lat, rk = make(2, 4, 2, 24, 16, 80, torch.float16, seed=7)
    keep, = on(torch.rand(2, 80, generator=torch.Generator().manual_seed(1)) > 0.3)
    keep[0, :40] = False                        # left padding over two and a half tiles
    cfg = DecodeKernelConfig(num_splits=splits, block_t=16)
    for mask in (keep, torch.where(keep, 0.0, -1e4).to(torch.float16), *on(torch.randn(2, 80))):
        out = decode_attention(q, qr, lat, rk, 0.3, key_mask_BT=mask, config=cfg)
        check(out, decode_attention_reference(q, qr, lat, rk, 0.3, key_mask_BT=mask), torch.float16, f"mask {mask.dtype}")


def test_softcap_bias_key_scale_and_kv_map():
    """Everything the absorbed form can carry, with a non-monotone kv-head map over two head blocks."""
    kv_map = [2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 0, 1, 2, 2, 1, 0, 1]
    q, qr, lat, rk = make(2, 20, 3, 96, 8, 61, torch.float32, seed=3)
    g = torch.Generator().manual_seed(5)
    q_bias, key_scale = on(torch.randn(2, 20, generator=g), torch.rand(2, 3, 61, generator=g) + 0.5)
    kw = dict(kv_head_of_query=kv_map, softcap=5.0, q_bias_BH=q_bias, key_scale_BHkvT=key_scale)
    for splits in (1, 4):
        out = decode_attention(q, qr, lat, rk, 0.4, config=DecodeKernelConfig(num_splits=splits, block_t=16, block_h=16), **kw)
        check(out, decode_attention_reference(q, qr, lat, rk, 0.4, **kw), torch.float32, f"{splits} splits")


@pytest.mark.filterwarnings("ignore:invalid value encountered")   # the interpreter's 0/0, on purpose
def test_empty_sequence_gives_nan_like_softmax():
    q, qr, lat, rk = make(2, 4, 2, 24, 8, 40, torch.float32)
    lengths, start = on(torch.tensor([40, 7]), torch.tensor([0, 7]))
    for splits in (1, 3):
        out = decode_attention(q, qr, lat, rk, 0.3, lengths, start_B=start, config=DecodeKernelConfig(num_splits=splits))
        ref = decode_attention_reference(q, qr, lat, rk, 0.3, lengths, start_B=start)
        assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()
        check(out[:1], ref[:1], torch.float32, f"{splits} splits")


def test_default_config():
    q, qr, lat, rk = make(1, 9, 3, 24, 8, 300, torch.bfloat16)
    out = decode_attention(q, qr, lat, rk, 0.125)
    check(out, decode_attention_reference(q, qr, lat, rk, 0.125), torch.bfloat16, "default config")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_glue_matches_model_math(dtype):
    """The dispatcher's fused path (W_ukᵀ q → kernel → W_uv) equals ``absorbed_attention`` on a
    left-padded decode-step mask, with key/value biases, RMS key scales and softcapping."""
    g = torch.Generator().manual_seed(11)
    b, h, hkv, n, r, v, c, t = 3, 6, 2, 12, 4, 16, 24, 37
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    q_nope, q_rope, latent, k_rope = rnd(b, h, 1, n), rnd(b, h, 1, r), rnd(b, t, c), rnd(b, 1, t, r)
    up_k, up_v, b_k, b_v = rnd(hkv, n, c), rnd(hkv, v, c), rnd(hkv, n), rnd(hkv, v)
    key_scale, = on((torch.rand(b, hkv, t, generator=g) + 0.5).to(dtype))
    kv_heads = [i // 3 for i in range(h)]
    kv, = on(torch.tensor(kv_heads))
    attention_mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    attention_mask[1, :5] = attention_mask[2, :30] = False                # left padding
    mask = attention_mask[:, None, None, :]
    args = (q_nope, q_rope, latent, k_rope, up_k, up_v, b_v, kv)
    for m in (mask, mask[2:]):                                               # per row, and one row for all
        ref = absorbed_attention(*args, 0.3, m, False, 8.0, b_k, key_scale)
        out = fused_absorbed(*args, kv_heads, 0.3, m, 8.0, b_k, key_scale)
        rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert rel <= TOL[dtype], f"{dtype}, mask {tuple(m.shape)}: relative error {rel:.3g} > {TOL[dtype]:.1g}"


def test_converted_model_decodes_with_the_kernel(monkeypatch):
    """A converted tiny Llama (GQA, c = 8, 2r = 4) decodes a left-padded batch step by step with the
    kernel in every layer; logits match the PyTorch absorbed path. Under the interpreter only the
    device precondition is waived (CPU tensors): every other refusal check still runs."""
    from helpers import tiny_llama

    import mla_pass
    from mla_pass.kernels import dispatch
    from mla_pass.modules.latent_attention import LatentAttention

    mla = mla_pass.convert(tiny_llama(n_kv=2), mla_pass.MLAConfig(d_kv=4, rope_freqs=2), progress=False).to(DEVICE)
    real, used = dispatch.kernel_refusal, []

    def counted_refusal(*args):
        reason = real(*args)
        if reason is not None and not ON_GPU and reason.startswith("tensors on cpu"):
            reason = None
        used.extend([1] if reason is None else [])
        return reason

    monkeypatch.setattr(dispatch, "kernel_refusal", counted_refusal)
    monkeypatch.setattr(dispatch, "KERNEL_MIN_CACHE_BYTES", 0)          # a tiny cache: use the kernel anyway
    ids, = on(torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0)))
    mask = torch.ones(3, 7, dtype=torch.long, device=DEVICE)
    mask[1, :2] = mask[2, :5] = 0                                            # left padding
    steps, = on(torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1)))
    logits = {}
    for kernel in (False, True):
        for m in mla.modules():
            if isinstance(m, LatentAttention):
                m.decode_kernel = kernel
        with torch.no_grad():
            _, *cache = mla.step_with_cache(ids, mask, mla.empty_cache(3))      # prefill: decompressed path
            m_all, out = mask, []
            for i in range(steps.shape[1]):
                m_all = torch.cat([m_all, m_all.new_ones(3, 1)], dim=1)
                step_logits, *cache = mla.step_with_cache(steps[:, i:i + 1], m_all, cache)
                out.append(step_logits)
        logits[kernel] = torch.cat(out, dim=1)
    n_sites = sum(isinstance(m, LatentAttention) for m in mla.modules())
    assert len(used) == n_sites * steps.shape[1], f"kernel ran {len(used)} times, expected {n_sites} × {steps.shape[1]}"
    err = (logits[True] - logits[False]).abs().max().item()
    assert err <= 1e-4, f"max |Δlogits| kernel vs PyTorch absorbed = {err:.3g} > 1e-4"
