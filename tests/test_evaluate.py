"""Evaluation: perplexity / agreement / KL equal a direct computation; passkey prompts are built right."""
import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import byte_tokenizer, tiny_llama

import mla_pass
from mla_pass import MLAConfig
from mla_pass.quality.evaluate import text_quality
from mla_pass.quality.passkey import ANSWER_PREFIX, PasskeyConfig, passkey, passkey_prompt
from mla_pass.quality.windows import text_windows

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))



def test_text_quality_equals_a_direct_computation():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=2), progress=False)
    q = text_quality(mla, ids, reference=model, chunk=5, progress=False)      # chunks that split windows
    with torch.no_grad():
        ref = model(ids).logits.double().log_softmax(-1)
        new = mla(ids).double().log_softmax(-1)
    ppl = F.cross_entropy(new[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).exp().item()
    agree = (ref.argmax(-1) == new.argmax(-1)).double().mean().item()
    kl = F.kl_div(new, ref, log_target=True, reduction="none").sum(-1).mean().item()
    assert q.perplexity == pytest.approx(ppl, rel=1e-9)
    assert q.agreement == pytest.approx(agree) and q.kl == pytest.approx(kl, rel=1e-9)
    ref_ppl = F.cross_entropy(ref[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).exp().item()
    assert q.reference_perplexity == pytest.approx(ref_ppl, rel=1e-9)
    assert kl > 1e-4 and q.agreement < 1                   # the reduced-rank model really differs
    assert (q.windows, q.length) == (3, 17)


def test_kl_of_a_model_to_itself_is_zero():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    q = text_quality(model, ids, reference=model, progress=False)
    assert q.kl == pytest.approx(0.0, abs=1e-12) and q.agreement == 1.0
    alone = text_quality(model, ids, progress=False)
    assert alone.kl is None and alone.agreement is None and alone.perplexity == pytest.approx(q.perplexity)


def test_bad_windows():
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        text_quality(tiny_llama(), torch.zeros(5, dtype=torch.long), progress=False)


@pytest.mark.parametrize("length", [400, 533])
def test_passkey_prompt_layout(length):
    tok = byte_tokenizer()
    positions = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tok, length, depth, "48151", filler="sentence")
        assert len(ids) == length
        text = tok.decode(ids)
        assert text.endswith(ANSWER_PREFIX) and text.count("48151") == 2
        positions.append(text.index("48151"))
    assert positions[0] < positions[1] < positions[2]
    with pytest.raises(ValueError, match="at least"):
        passkey_prompt(tok, 40, 0.5, "48151", filler="sentence")


def test_passkey_scores_exact_retrievals():
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    tok = byte_tokenizer()
    cfg = PasskeyConfig(lengths=(260, 300), depths=(0.2, 0.8), trials=2, filler="sentence")
    result = passkey(model, tok, cfg, progress=False)
    assert len(result.trials) == 8 and len({t.key for t in result.trials}) > 1
    for t in result.trials:
        found = re.search(r"\d+", t.answer)
        assert t.correct == (found is not None and found.group() == t.key)
    assert set(result.by_length) == {260, 300}
    assert passkey(model, tok, cfg, progress=False).trials == result.trials            # seeded


def test_bad_passkey_config():
    with pytest.raises(ValueError, match="filler"):
        PasskeyConfig(filler="lorem")
    with pytest.raises(ValueError, match="depths"):
        PasskeyConfig(depths=(1.5,))


def test_text_windows_too_short_names_the_limit():
    from mla_pass import assets
    tok = byte_tokenizer()
    try:
        ids = text_windows(tok, "alice29.txt", 2, 64)
    except assets.AssetError as e:
        pytest.skip(f"text could not be fetched: {e}")
    assert ids.shape == (2, 64)
    with pytest.raises(ValueError, match=r"alice29.txt has [\d,]+ tokens.*Use at most \d+ windows"):
        text_windows(tok, "alice29.txt", 100_000, 512)


@pytest.mark.slow
def test_original_smollm2_retrieves_passkeys(smollm2):
    model, tok = smollm2
    result = passkey(model, tok, PasskeyConfig(lengths=(1024,), depths=(0.2, 0.8)), progress=False)
    assert result.score() == 1.0, result.trials
