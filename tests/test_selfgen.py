"""Self-generated distillation text: deterministic, cached (and reused), never prompted from the
held-out text, useful for distillation; `mla-pass recover --distill-text generated`; clear errors."""
import os

import pytest
import torch
from helpers import byte_tokenizer, tiny_llama

import mla_pass
from mla_pass import DistillConfig, MLAConfig
from mla_pass.quality.selfgen import CHAT_PROMPTS, SelfGenConfig, distillation_text, generated_windows, interleave

torch.set_num_threads(int(os.environ.get("MLA_PASS_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def texts():
    from mla_pass import assets
    try:
        return {name: assets.text_path(name) for name in assets.TEXTS}
    except assets.AssetError as e:
        pytest.skip(f"text could not be fetched: {e}")


@pytest.fixture
def cache(tmp_path, texts):
    """A fresh cache folder that sees the already fetched texts."""
    (tmp_path / "text").symlink_to(next(iter(texts.values())).parent, target_is_directory=True)
    return tmp_path


@pytest.fixture(scope="module")
def model():
    """A tiny Llama over the byte tokenizer's 256 ids, far from uniform."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


class _Calls:
    """Counts the model's forward passes (generation is the only thing that runs it here)."""
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


CONFIG = SelfGenConfig(tokens=1000, length=160, prefix=8, batch_size=2, prompts="mix")


def test_same_seed_same_windows_other_seed_other_windows(model, cache):
    tok = byte_tokenizer()
    a = generated_windows(model, tok, CONFIG, cache_dir=cache, use_cache=False, progress=False)
    b = generated_windows(model, tok, CONFIG, cache_dir=cache, use_cache=False, progress=False)
    c = generated_windows(model, tok, SelfGenConfig(**{**CONFIG.__dict__, "seed": 1}), cache_dir=cache,
                          use_cache=False, progress=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (7, 160) and a.tokens.dtype == torch.int64     # ceil(1000 / 160) windows
    assert 0 <= int(a.tokens.min()) and int(a.tokens.max()) < 256
    assert a.path is None and not any(cache.glob("selfgen/*"))


def test_cache_is_reused_and_extended_without_sampling_again(model, cache):
    tok = byte_tokenizer()
    calls = _Calls(model)
    try:
        first = generated_windows(model, tok, CONFIG, cache_dir=cache, progress=False)
        sampled = calls.n
        assert sampled > 0 and first.generated_now == 8 and first.path.is_file()      # 4 batches of 2
        again = generated_windows(model, tok, CONFIG, cache_dir=cache, progress=False)
        assert calls.n == sampled, "the second call ran the model: the cache was not used"
        assert again.generated_now == 0 and torch.equal(again.tokens, first.tokens)
        assert again.cpu_seconds == pytest.approx(first.cpu_seconds) and first.cpu_seconds > 0   # the cost is kept
        longer = generated_windows(model, tok, SelfGenConfig(**{**CONFIG.__dict__, "tokens": 1920}), cache_dir=cache,
                                   progress=False)
        assert longer.generated_now == 4 and 0 < calls.n - sampled < sampled     # only the two new batches
        assert torch.equal(longer.tokens[:7], first.tokens)
        fresh = generated_windows(model, tok, SelfGenConfig(**{**CONFIG.__dict__, "tokens": 1920}), cache_dir=cache,
                                  use_cache=False, progress=False)
        assert torch.equal(fresh.tokens, longer.tokens)        # extending the cache = generating at once
    finally:
        calls.handle.remove()


def test_prompts_come_from_the_training_books_or_the_chat_list_never_the_held_out_text(model, cache, texts):
    tok = byte_tokenizer()
    gen = generated_windows(model, tok, CONFIG, cache_dir=cache, use_cache=False, progress=False)
    books = {name: tok(path.read_text(encoding="latin-1")).input_ids for name, path in texts.items()}

    def found_in(name, ids):
        text = books[name]
        return any(text[i:i + len(ids)] == ids for i in range(len(text) - len(ids) + 1))

    for b in range(4):                            # batches alternate: books, chat, books, chat
        for row in gen.tokens[2 * b: 2 * b + 2].tolist():
            if b % 2 == 0:
                prefix = row[:CONFIG.prefix]
                assert any(found_in(n, prefix) for n in ("alice29.txt", "asyoulik.txt", "plrabn12.txt")), prefix
            else:
                prompt = tok(f"Question: {CHAT_PROMPTS[b // 2]}\nAnswer:").input_ids
                assert row[:len(prompt)] == prompt
    with pytest.raises(ValueError, match="held-out"):
        generated_windows(model, tok, CONFIG, cache_dir=cache, texts=("alice29.txt", "lcet10.txt"), progress=False)


def test_distillation_on_generated_windows_lowers_the_kl(model, cache):
    tok = byte_tokenizer()
    config = SelfGenConfig(tokens=16 * 64, length=64, prefix=8, batch_size=4, prompts="books")
    train = generated_windows(model, tok, config, cache_dir=cache, progress=False).tokens
    held = generated_windows(model, tok, SelfGenConfig(**{**config.__dict__, "seed": 7, "tokens": 4 * 64}),
                             cache_dir=cache, progress=False).tokens
    mla = mla_pass.convert(model, MLAConfig(d_kv=2, rope_freqs=1), progress=False)

    def kl(ids):
        with torch.no_grad():
            ref = model(ids).logits.log_softmax(-1)
            return (ref.exp() * (ref - mla(ids).log_softmax(-1))).sum(-1).mean().item()

    before = kl(train), kl(held)
    report = mla_pass.distill(mla, model, train, DistillConfig(steps=30, lr=1e-2, batch_size=4), progress=False)
    after = kl(train), kl(held)
    assert report.steps == 30 and report.tokens == 30 * 4 * 64
    assert after[0] < 0.9 * before[0] and after[1] < before[1], (before, after)


def test_distillation_text_kinds(model, cache):
    tok = byte_tokenizer()
    real, none = distillation_text("real", model, tok, length=160, real_windows=5, cache_dir=cache)
    assert none is None and real.shape == (5, 160)
    gen_only, gen = distillation_text("generated", model, tok, length=160, generated=CONFIG, cache_dir=cache,
                                      progress=False)
    assert torch.equal(gen_only, gen.tokens)
    mix, _ = distillation_text("mix", model, tok, length=160, generated=CONFIG, real_windows=5, cache_dir=cache,
                               progress=False)
    assert mix.shape == (12, 160)
    assert torch.equal(mix[0], real[0]) and torch.equal(mix[1], gen.tokens[0]) and torch.equal(mix[-1], gen.tokens[-1])
    assert torch.equal(interleave(torch.zeros(1, 2), torch.ones(3, 2))[:, 0], torch.tensor([0.0, 1, 1, 1]))


def test_bad_options_give_clear_errors(model, cache):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        SelfGenConfig(tokens=0)
    with pytest.raises(ValueError, match="prompts must be one of"):
        SelfGenConfig(prompts="web")
    with pytest.raises(ValueError, match="prefix must be"):
        SelfGenConfig(length=32, prefix=32)
    with pytest.raises(ValueError, match="temperature"):
        SelfGenConfig(temperature=0)
    with pytest.raises(ValueError, match="must be one of"):
        distillation_text("books", model, tok, cache_dir=cache)
    with pytest.raises(ValueError, match="same length"):
        distillation_text("generated", model, tok, length=64, generated=CONFIG, cache_dir=cache)
    with pytest.raises(ValueError, match="chat prompt takes"):
        generated_windows(model, tok, SelfGenConfig(tokens=40, length=40, prefix=8, prompts="chat"), cache_dir=cache)
    with pytest.raises(ValueError, match="model's own tokenizer"):      # 128 ids: the byte tokenizer's do not fit
        generated_windows(tiny_llama(), tok, CONFIG, cache_dir=cache, progress=False)


def test_cli_recover_on_generated_text(model, cache, tmp_path_factory, capsys):
    from mla_pass.cli import main

    root = tmp_path_factory.mktemp("selfgen_cli")
    model.save_pretrained(str(root / "hf"))
    byte_tokenizer().save_pretrained(str(root / "hf"))
    common = ["--cache-dir", str(cache)]
    assert main(common + ["convert", str(root / "hf"), "--out", str(root / "mla"), "--d-kv", "2",
                          "--rope-freqs", "1"]) == 0
    args = common + ["recover", str(root / "mla"), "--steps", "0", "--distill-steps", "3", "--distill-length", "160",
                     "--distill-text", "generated", "--generated-tokens", "600"]
    capsys.readouterr()
    assert main(args + ["--out", str(root / "a")]) == 0
    out = capsys.readouterr().out
    assert "generation: 4 windows" in out and "distillation on generated text: 3 steps" in out, out
    assert main(args + ["--out", str(root / "b")]) == 0
    assert "(cached)" in capsys.readouterr().out                      # the second run sampled nothing
    with pytest.raises(SystemExit, match="generated-tokens must be >= 1"):
        main(common + ["recover", str(root / "mla"), "--out", str(root / "c"), "--distill-text", "mix",
                       "--generated-tokens", "0"])
