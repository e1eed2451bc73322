"""The autocast dtype chosen from what the device does fast; the CE objective and MHA2MLA's schedule."""
import pytest
import torch
from helpers import tiny_llama

import mla_pass
from mla_pass import DistillConfig, MLAConfig
from mla_pass.quality import precision
from mla_pass.quality.distillation import next_token_loss


@pytest.fixture
def cpu(monkeypatch):
    """Pretend CPU flags and matmul timings; the per-process cache is cleared around each test."""
    timed = []

    def pretend(flags, fp32=1.0, bf16=1.0):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision, "matmul_seconds",
                            lambda dtype, **kw: timed.append(dtype) or (fp32 if dtype == torch.float32 else bf16))
        precision._cpu_choice.cache_clear()
        return timed

    yield pretend
    precision._cpu_choice.cache_clear()


def test_a_cpu_without_bf16_instructions_gets_float32_without_timing(cpu):
    timed = cpu({"sse2", "avx2", "fma"})
    dtype, why = precision.resolve_autocast("auto", torch.device("cpu"))
    assert dtype is None and "no bf16 instructions" in why and timed == []


@pytest.mark.parametrize("fp32,bf16,want", [(2.0, 1.0, "bfloat16"), (1.1, 1.0, None), (1.0, 3.0, None)])
def test_a_cpu_with_bf16_instructions_gets_bf16_only_where_it_measures_faster(cpu, fp32, bf16, want):
    timed = cpu({"avx2", "avx512f", "avx512_bf16"}, fp32, bf16)
    dtype, why = precision.resolve_autocast("auto", "cpu")
    assert dtype == want and set(timed) == {torch.float32, torch.bfloat16}
    precision.resolve_autocast("auto", "cpu")
    assert len(timed) == 2, "measured once per process"


def test_explicit_choices_and_bad_ones():
    assert precision.resolve_autocast("bfloat16", "cpu") == ("bfloat16", "asked for")
    assert precision.resolve_autocast(None, "cpu") == (None, "asked for")
    with pytest.raises(ValueError, match="autocast must be one of"):
        precision.resolve_autocast("int8", "cpu")
    assert precision.matmul_seconds(torch.float32, m=8, k=8, n=8, repeats=3) > 0


def test_a_resumed_run_keeps_the_dtype_it_started_with(cpu, tmp_path, capsys):
    model = tiny_llama(layers=1)
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=1), progress=False)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cpu({"avx512_bf16"}, fp32=2.0, bf16=1.0)
    first = mla_pass.distill(mla, model, tokens, DistillConfig(steps=2), max_seconds=0, checkpoint=tmp_path)
    assert first.autocast == "bfloat16" and "distillation autocast: bfloat16" in capsys.readouterr().out
    cpu({"avx2"})                                          # another machine now: it would choose float32
    second = mla_pass.distill(mla, model, tokens, DistillConfig(steps=2), checkpoint=tmp_path, progress=False)
    assert second.complete and second.autocast == "bfloat16"


def test_next_token_loss_is_the_shifted_cross_entropy():
    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    lp = logits.log_softmax(-1)
    manual = -torch.stack([lp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(4)]).mean()
    assert torch.allclose(next_token_loss(logits, tokens), manual, atol=1e-6)


def test_the_ce_objective_needs_no_teacher_and_lowers_the_cross_entropy():
    model = tiny_llama(layers=2)
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=1), progress=False)
    tokens = torch.randint(0, 16, (8, 24), generator=torch.Generator().manual_seed(1))   # a small alphabet: learnable
    with torch.no_grad():
        before = next_token_loss(mla(tokens), tokens).item()
    config = DistillConfig.mha2mla(steps=30, batch_size=4, lr=3e-3, other_lr=3e-3, autocast=None)
    report = mla_pass.distill(mla, None, tokens, config, progress=False)
    with torch.no_grad():
        after = next_token_loss(mla(tokens), tokens).item()
    assert report.steps == 30 and after < before - 0.5
    with pytest.raises(TypeError, match="'kl' objective"):
        mla_pass.distill(mla, None, tokens, DistillConfig(steps=1))


def test_the_mha2mla_recipe_and_its_schedule():
    c = DistillConfig.mha2mla(steps=120)
    assert (c.objective, c.train, c.lr, c.other_lr, c.adam_betas, c.weight_decay) == ("ce", "all", 1e-4, 1e-4,
                                                                                     (0.9, 0.95), 0.0)
    factors = [c.lr_factor(s, 120) for s in range(120)]
    assert c.warmup_steps == 12 and factors[0] < factors[11] < 1 and factors[12] == 1.0
    assert all(f == 1.0 for f in factors[12:100]), "constant until the last 1/6"
    assert factors[100] == 1.0 and factors[119] < 0.1 and all(a >= b for a, b in zip(factors[100:], factors[101:]))
    assert c.lr_factor(110, 120) == pytest.approx(1 - (10 / 20) ** 0.5)
    for bad, match in (({"objective": "mse"}, "objective"), ({"decay": "step"}, "decay"),
                       ({"decay_fraction": 0}, "decay_fraction"), ({"adam_betas": (0.9, 1.0)}, "adam_betas")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)
