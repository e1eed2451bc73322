"""How far each int8 attention formulation is from the fp32 absorbed attention on REAL activations.

SmolLM2-135M converted as ``benchmarks/quantized.py`` does (calibrated on alice29, d_kv, r=4),
run in PyTorch over ``past`` tokens of held-out text (lcet10.txt from token 2000, prefilled in
chunks); at the next decode step every layer's absorbed-attention inputs are captured
(``absorbed_attention_mqa``'s arguments: latent query, rope query, latent cache, rope keys).
Each one-layer ONNX graph of ``benchmarks/attention_ops.py`` then runs on those tensors in
onnxruntime, and its latent output [H, C] → per-head output [H, d_h] (× the value up-projection)
is compared with the fp32 heads-as-rows graph on the float latent: relative error
‖o − o_fp32‖ / ‖o_fp32‖ per layer (median and max over the 30 layers).

    python benchmarks/int8_attention_error.py --past 8192 --d-kv 32
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import attention_ops as ops


def capture(past: int, d_kv: int, chunk: int = 512) -> list[dict]:
    """Per layer, the absorbed decode step's inputs after ``past`` real tokens."""
    import mla_pass
    from mla_pass import MLAConfig, assets
    from mla_pass.quality.windows import HELD_OUT_START, HELD_OUT_TEXT, calibration_windows
    from mla_pass.kernels import dispatch

    model, tok = assets.load_smollm2()
    mla = mla_pass.convert(model, MLAConfig(d_kv=d_kv, rope_freqs=4), calibration=calibration_windows(tok, 16, 512),
                           progress=False)
    ids = tok(assets.read_text(HELD_OUT_TEXT), return_tensors="pt").input_ids[0]
    ids = ids[HELD_OUT_START:HELD_OUT_START + past + 1][None]
    if ids.shape[1] != past + 1:
        raise ValueError(f"{HELD_OUT_TEXT} has too few tokens for past={past}")
    mla.set_form("absorbed")
    cache = mla.empty_cache(1)
    got = []
    with torch.no_grad():
        for s in range(0, past, chunk):
            e = min(past, s + chunk)
            cache = list(mla.step_with_cache(ids[:, s:e], torch.ones(1, e, dtype=torch.long), cache)[1:])
        real = dispatch.absorbed_attention_mqa

        def record(q_nope, q_rope, latent, k_rope, up_key, up_value, b_value, kv_of_q, scale, mask=None, *a, **k):
            got.append({"q_nope": q_nope, "q_rope": q_rope, "latent": latent, "k_rope": k_rope, "up_key": up_key,
                        "up_value": up_value, "kv_of_q": kv_of_q, "scale": scale, "mask": mask})
            return real(q_nope, q_rope, latent, k_rope, up_key, up_value, b_value, kv_of_q, scale, mask, *a, **k)
        dispatch.absorbed_attention_mqa = record
        try:
            mla.step_with_cache(ids[:, past:], torch.ones(1, past + 1, dtype=torch.long), cache)
        finally:
            dispatch.absorbed_attention_mqa = real
    return got


def layer_feeds(rec: dict):
    """The one-layer graphs' inputs (batch 1, one query) from a captured call."""
    kv = rec["kv_of_q"]
    q_lat = ((rec["q_nope"] * rec["scale"]) @ rec["up_key"].index_select(0, kv))[:, :, 0]         # [1,H,C]
    b, h = q_lat.shape[:2]
    n_kv, r2 = rec["k_rope"].shape[1], rec["k_rope"].shape[-1]
    q_rope = (rec["q_rope"] * rec["scale"]).reshape(b, n_kv, h // n_kv, r2)
    k_rope_t = rec["k_rope"].transpose(-1, -2).contiguous()
    t = rec["latent"].shape[1]
    mask = torch.zeros(b, 1, t)
    if rec["mask"] is not None:
        m = rec["mask"].reshape(b, 1, t)
        mask = torch.zeros_like(mask).masked_fill(~m, -1e30) if m.dtype == torch.bool else m.float()
    f = lambda x: np.ascontiguousarray(x.detach().float().numpy())
    return f(q_lat), f(rec["latent"]), f(q_rope), f(k_rope_t), f(mask)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--past", type=int, default=8192)
    p.add_argument("--d-kv", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path, help="keep the captured tensors here (torch.save) / reuse them")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.save and a.save.is_file():
        recs = torch.load(a.save)
    else:
        recs = capture(a.past, a.d_kv)
        if a.save:
            torch.save(recs, a.save)
    print(f"captured {len(recs)} layers at past {a.past} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    errs = {name: [] for name in ops.INT8_FORMS}
    for rec in recs:
        q, lat, qr, krt, mask = layer_feeds(rec)
        t, c = lat.shape[1:]
        r2 = qr.shape[-1]
        up_v = rec["up_value"].index_select(0, rec["kv_of_q"]).float().numpy()                   # [H,V,C]

        def head_out(o, up_v=up_v):
            return np.einsum("hc,hvc->hv", o[0], up_v)
        ref_s = ops.session(ops.matmul_mla(t, c, r2), a.threads)
        ref = head_out(ref_s.run(None, {"q": q, "latent": lat, "q_rope": qr, "k_rope_t": krt, "mask": mask})[0])
        for name, feeds in ops.int8_feeds(q, lat, qr, krt, mask).items():
            s = ops.session(ops.INT8_FORMS[name](t, c, r2), a.threads)
            o = head_out(s.run(None, feeds)[0])
            errs[name].append(float(np.linalg.norm(o - ref) / np.linalg.norm(ref)))
    print(f"SmolLM2-135M d_kv={a.d_kv} r=4 (calibrated), decode step after {a.past} held-out tokens; "
          "relative error of the attention output vs fp32, over layers")
    print("| formulation | median | max | worst layer |")
    print("|---|---|---|---|")
    for name, e in errs.items():
        print(f"| {name} | {np.median(e):.2e} | {max(e):.2e} | {int(np.argmax(e))} |")


if __name__ == "__main__":
    main()
