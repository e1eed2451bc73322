"""The torch-free runtime (mla_pass.runtime) on small real ONNX decoders built in tests/toy_onnx.py.

Generation is checked against a numpy recomputation of the whole sequence at every step (no
cache), for an MLA-style cache (latent + rope_key) and a key/value cache, each with a
concatenating and an in-place (TensorScatter) program.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toy_onnx import ToySpec, reference_greedy, reference_logits, train_tokenizer, write_folder

from mla_pass.runtime import (
    CacheError,
    EngineError,
    KVCache,
    Manifest,
    ManifestError,
    OnnxEngine,
    SamplingConfig,
    positions,
    sample,
)
from mla_pass.runtime.sampling import distribution, top_k_mask, top_p_mask
from mla_pass.runtime.text import IncrementalDecoder

PROMPTS = ["the cat sat on", "hello world, hello runtime; the cache grows one", "café 東京"]
VARIANTS = [("mla", "concat"), ("original", "concat"), ("mla", "in_place")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    out = {}
    for kind, update in VARIANTS:
        spec = ToySpec(kind=kind, cache_update=update, vocab=tokenizer.get_vocab_size())
        path = tmp_path_factory.mktemp(f"{kind}-{update}")
        write_folder(path, spec, tokenizer, eos_token_ids=[])
        out[kind, update] = (path, spec)
    return out


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


# -- generation against the numpy reference -------------------------------------------------------
@pytest.mark.parametrize("kind,update", VARIANTS)
def test_greedy_equals_full_recomputation(folders, tokenizer, kind, update):
    folder, spec = folders[kind, update]
    engine = OnnxEngine(folder, threads=1)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        got = engine.generate(prompt, max_new_tokens=12)
        assert got.completions[0].prompt_ids == ids
        assert got.token_ids[0] == reference_greedy(spec, ids, 12), prompt
        assert got.completions[0].finish_reason == "length"


@pytest.mark.parametrize("kind,update", VARIANTS)
def test_prefill_and_decode_logits(folders, kind, update):
    """step() with numpy caches and with a bound KVCache both give the reference logits (≤ 1e-4)."""
    folder, spec = folders[kind, update]
    engine = OnnxEngine(folder, threads=1)
    seq = [5, 17, 42, 9, 100, 3, 250, 8]
    ref = reference_logits(spec, seq)
    out = engine.step(np.array([seq[:5]]), np.ones((1, 5), np.int64))
    kv = engine.new_cache(1, 8)
    bound = engine.step(np.array([seq[:5]]), np.ones((1, 5), np.int64), cache=kv)
    for logits in (out.logits, bound.logits):
        err = np.abs(logits[0] - ref[:5]).max()
        assert err <= 1e-4, f"prefill logits differ by {err:.2e} (allowed 1e-4)"
    cache = out.cache
    for t in range(5, 8):
        mask = np.ones((1, t + 1), np.int64)
        out = engine.step(np.array([[seq[t]]]), mask, np.array([[t]]), cache)
        bound = engine.step(np.array([[seq[t]]]), mask, np.array([[t]]), kv)
        cache = out.cache
        for logits in (out.logits, bound.logits):
            err = np.abs(logits[0, -1] - ref[t]).max()
            assert err <= 1e-4, f"decode logits at {t} differ by {err:.2e} (allowed 1e-4)"
        assert [c.shape for c in cache] == [e.concrete_shape(1, t + 1) for e in engine.manifest.cache]
        for a, b in zip(cache, kv.arrays()):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind,update", VARIANTS)
def test_chunked_prefill_gives_the_logits_of_one_step(folders, tokenizer, kind, update):
    """Left-padded prompts fed through the cache 1, 3 or 5 tokens per step: the last logits and the
    cache equal those of one step over the whole prompt (≤ 1e-5), and generations are unchanged."""
    folder, spec = folders[kind, update]
    engine = OnnxEngine(folder, threads=1, prefill_chunk=None)
    rows = [tokenizer.encode(p).ids for p in PROMPTS]
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    whole = engine.new_cache(len(rows), width)
    want = engine.prefill(ids, mask, whole)
    assert want.shape == (len(rows), spec.vocab)
    for chunk in (1, 3, 5):
        kv = engine.new_cache(len(rows), width)
        err = np.abs(engine.prefill(ids, mask, kv, chunk=chunk) - want).max()
        assert err <= 1e-5, f"chunk {chunk}: last logits differ by {err:.2e} (allowed 1e-5)"
        assert kv.length == width
        for e, a, b in zip(engine.manifest.cache, kv.arrays(), whole.arrays()):   # real tokens (pads: unspecified)
            for row in range(len(rows)):
                real = np.flatnonzero(mask[row])
                np.testing.assert_allclose(a[row].take(real, e.time_axis - 1), b[row].take(real, e.time_axis - 1),
                                           atol=1e-5)
    chunked = OnnxEngine(folder, threads=1, prefill_chunk=2).generate(PROMPTS, max_new_tokens=6)
    assert chunked.token_ids == engine.generate(PROMPTS, max_new_tokens=6).token_ids
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1"):
        OnnxEngine(folder, prefill_chunk=0)
    with pytest.raises(TypeError, match="KVCache"):
        engine.prefill(ids, mask, [])


@pytest.mark.parametrize("kind,update", VARIANTS)
def test_batch_equals_one_at_a_time(folders, kind, update):
    folder, spec = folders[kind, update]
    engine = OnnxEngine(folder, threads=1)
    batch = engine.generate(PROMPTS, max_new_tokens=10)
    lengths = {len(c.prompt_ids) for c in batch.completions}
    assert len(lengths) == len(PROMPTS), "the prompts must differ in length to test left padding"
    for prompt, completion in zip(PROMPTS, batch.completions):
        alone = engine.generate(prompt, max_new_tokens=10).completions[0]
        assert completion.token_ids == alone.token_ids
        assert completion.text == alone.text
        assert completion.token_ids == reference_greedy(spec, completion.prompt_ids, 10)


def test_concurrent_generations_equal_sequential_ones(folders):
    """One engine used from several threads: each generation gets what it gets alone (they share the
    engine's cache and IO binding, so the engine runs them one after another)."""
    from concurrent.futures import ThreadPoolExecutor

    folder, _ = folders["mla", "in_place"]
    engine = OnnxEngine(folder, threads=1)
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + i % 5) for i in range(16)]
    want = [engine.generate(p, max_new_tokens=n).completions[0].token_ids for p, n in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: engine.generate(job[0], max_new_tokens=job[1]).completions[0].token_ids, jobs))
    assert got == want


def test_positions_of_left_padded_rows():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_end_ids_stop_each_row(folders, tokenizer, tmp_path):
    folder, spec = folders["mla", "concat"]
    ids = [tokenizer.encode(p).ids for p in PROMPTS[:2]]
    ref = [reference_greedy(spec, i, 12) for i in ids]
    end = ref[0][3]                                  # row 0 produces it at step 4
    assert end not in ref[1], "pick prompts whose continuations differ"
    eos_folder = tmp_path / "eos"
    write_folder(eos_folder, spec, tokenizer, eos_token_ids=[end])
    got = OnnxEngine(eos_folder, threads=1).generate(PROMPTS[:2], max_new_tokens=12)
    assert got.token_ids[0] == ref[0][:4] and got.completions[0].finish_reason == "eos"
    assert got.token_ids[1] == ref[1] and got.completions[1].finish_reason == "length"
    # the same id given as a stop id instead of an eos id
    got = OnnxEngine(folder, threads=1).generate(PROMPTS[:2], max_new_tokens=12, stop=[end])
    assert got.token_ids[0] == ref[0][:4] and got.completions[0].finish_reason == "stop"


def test_stop_string_cuts_text_and_stream(folders):
    engine = OnnxEngine(folders["original", "concat"][0], threads=1)
    full = engine.generate(PROMPTS[0], max_new_tokens=16).completions[0]
    text = full.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2]
                and text.find(text[i:i + 2]) == i)
    pieces = []
    got = engine.generate(PROMPTS[0], max_new_tokens=16, stop=stop, on_token=lambda r, t, p: pieces.append(p))
    c = got.completions[0]
    assert c.finish_reason == "stop" and c.text == text[:text.index(stop)]
    assert "".join(pieces) == c.text
    assert c.token_ids == full.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(full.token_ids)


def test_streamed_pieces_join_to_text(folders):
    engine = OnnxEngine(folders["mla", "in_place"][0], threads=1)
    pieces: dict[int, list[str]] = {}
    tokens: dict[int, list[int]] = {}

    def on_token(row, token, piece):
        pieces.setdefault(row, []).append(piece)
        tokens.setdefault(row, []).append(token)

    got = engine.generate(PROMPTS, max_new_tokens=9, on_token=on_token)
    for row, c in enumerate(got.completions):
        assert tokens[row] == c.token_ids
        assert "".join(pieces[row]) == c.text


def test_incremental_decoder_handles_multibyte_characters(tokenizer):
    text = "café naïve 東京 ☕ über straße"
    ids = tokenizer.encode(text).ids
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert split, "the tokenizer must split some character over tokens for this test to mean anything"
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_sampling_is_seeded_and_stays_in_top_k(folders, tokenizer):
    folder, spec = folders["mla", "concat"]
    engine = OnnxEngine(folder, threads=1)
    kw = dict(max_new_tokens=8, temperature=1.5, top_k=4)
    a = engine.generate(PROMPTS[:2], seed=7, **kw).token_ids
    assert a == engine.generate(PROMPTS[:2], seed=7, **kw).token_ids
    assert a != engine.generate(PROMPTS[:2], seed=8, **kw).token_ids
    assert a != engine.generate(PROMPTS[:2], max_new_tokens=8).token_ids   # not greedy
    seq = tokenizer.encode(PROMPTS[0]).ids
    for tok in a[0]:
        logits = reference_logits(spec, seq)[-1]
        assert tok in np.argsort(-logits)[:4]
        seq.append(tok)


# -- sampling functions ---------------------------------------------------------------------------
def test_top_k_mask_exact_with_ties():
    logits = np.array([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert np.flatnonzero(top_k_mask(logits, 1)).tolist() == [1, 3]      # ties at the k-th value stay
    assert np.flatnonzero(top_k_mask(logits, 3)).tolist() == [1, 2, 3]
    assert top_k_mask(logits, 9).all()


def test_top_p_mask_exact():
    probs = np.array([[0.125, 0.5, 0.1875, 0.1875]])                    # exact in binary: boundaries are exact
    assert np.flatnonzero(top_p_mask(probs, 0.5)).tolist() == [1]
    assert np.flatnonzero(top_p_mask(probs, 0.6)).tolist() == [1, 2]     # tie: the lower id first
    assert np.flatnonzero(top_p_mask(probs, 0.875)).tolist() == [1, 2, 3]
    assert np.flatnonzero(top_p_mask(probs, 0.9)).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(top_p_mask(probs, 0.01)).tolist() == [1]       # the top token always stays


def test_distribution_and_draw_frequencies():
    logits = np.log(np.array([[0.05, 0.4, 0.25, 0.2, 0.1]]))
    p = distribution(logits, SamplingConfig(temperature=1.0))
    np.testing.assert_allclose(p, [[0.05, 0.4, 0.25, 0.2, 0.1]], atol=1e-12)
    p = distribution(logits, SamplingConfig(temperature=2.0))
    want = np.sqrt([0.05, 0.4, 0.25, 0.2, 0.1])
    np.testing.assert_allclose(p[0], want / want.sum(), atol=1e-12)
    config = SamplingConfig(temperature=1.0, top_k=3, top_p=0.6)            # top-3 {1,2,3}, then p: {1,2}
    p = distribution(logits, config)
    np.testing.assert_allclose(p[0], [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0], atol=1e-12)
    rows = np.repeat(logits, 20000, axis=0)
    draws = sample(rows, config, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert freq[[0, 3, 4]].sum() == 0
    np.testing.assert_allclose(freq, p[0], atol=0.015)
    assert np.array_equal(draws, sample(rows, config, np.random.default_rng(0)))


def test_greedy_and_bad_sampling_settings():
    logits = np.array([[0.0, 2.0, 2.0, 1.0]])
    assert sample(logits, SamplingConfig(), np.random.default_rng(0)).tolist() == [1]
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_k=1.5), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# -- bad input ------------------------------------------------------------------------------------
def test_missing_or_damaged_files(folders, tmp_path):
    src = folders["mla", "concat"][0]
    with pytest.raises(ManifestError, match="no manifest.json"):
        OnnxEngine(tmp_path)
    with pytest.raises(ManifestError, match="not a folder"):
        OnnxEngine(tmp_path / "nowhere")

    d = _copy(src, tmp_path / "no-model")
    (d / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="model.onnx is missing"):
        OnnxEngine(d)

    d = _copy(src, tmp_path / "bad-weights")
    data = bytearray((d / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (d / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.onnx.data does not match its SHA-256"):
        OnnxEngine(d)

    d = _copy(src, tmp_path / "bad-manifest")
    (d / "manifest.json").write_text((d / "manifest.json").read_text()[:-20])
    with pytest.raises(ManifestError, match="not valid JSON"):
        OnnxEngine(d)

    d = _copy(src, tmp_path / "bad-update")
    raw = json.loads((d / "manifest.json").read_text())
    raw["cache_update"] = "sideways"
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="cache_update"):
        OnnxEngine(d)


def test_model_onnxruntime_cannot_load(folders, tmp_path):
    d = _copy(folders["mla", "concat"][0], tmp_path / "garbage")
    (d / "model.onnx").write_bytes(b"this is not an onnx model")
    Manifest.read(d, verify=False).write(d)         # hashes match: the model itself is the problem
    with pytest.raises(EngineError, match="(?s)could not load .*model.onnx.*export the folder again"):
        OnnxEngine(d)


def test_model_and_manifest_disagree(folders, tmp_path):
    d = _copy(folders["mla", "concat"][0], tmp_path / "mismatch")
    m = Manifest.read(d, verify=False)
    m.cache[1].shape[1] += 1                        # rope heads
    m.cache[2].dtype = "float16"
    m.cache = m.cache[:-1]                          # the model has an input the manifest lacks
    m.write(d)
    with pytest.raises(EngineError) as e:
        OnnxEngine(d)
    msg = str(e.value)
    assert "past_key_values.0.rope_key has size 2 on axis 1, the manifest says 3" in msg
    assert "past_key_values.1.latent has type tensor(float), the manifest says float16" in msg
    assert "inputs the manifest does not name: ['past_key_values.1.rope_key']" in msg


def test_cache_of_wrong_shape_or_dtype(folders):
    engine = OnnxEngine(folders["mla", "concat"][0], threads=1)
    out = engine.step(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64))
    mask = np.ones((1, 4), np.int64)
    bad = list(out.cache)
    bad[1] = bad[1][:, :, :2]
    with pytest.raises(CacheError, match=r"past_key_values.0.rope_key: expected shape \(1, 2, 3, 4\).*got \(1, 2, 2, 4\)"):
        engine.step(np.array([[4]]), mask, cache=bad)
    bad = list(out.cache)
    bad[2] = bad[2].astype(np.float16)
    with pytest.raises(CacheError, match="past_key_values.1.latent: expected dtype float32, got float16"):
        engine.step(np.array([[4]]), mask, cache=bad)
    with pytest.raises(CacheError, match="expected 4 cache tensors"):
        engine.step(np.array([[4]]), mask, cache=out.cache[:3])
    with pytest.raises(CacheError, match="unknown cache entries"):
        engine.step(np.array([[4]]), mask, cache={"past.x": out.cache[0]})
    with pytest.raises(CacheError, match="covers 3 past tokens but no cache"):
        engine.step(np.array([[4]]), mask)
    kv = engine.new_cache(1, 4)
    with pytest.raises(CacheError, match="past_key_values.0.latent: expected shape"):
        kv.load([c[:, :, :1] if c.ndim == 4 else c[:, :, :1] for c in out.cache], past=3)
    kv.load(out.cache)
    engine.step(np.array([[4]]), mask, cache=kv)
    with pytest.raises(CacheError, match="holds at most 4 tokens; this step needs 5"):
        engine.step(np.array([[5]]), np.ones((1, 5), np.int64), cache=kv)


def test_bad_prompts(folders, tokenizer):
    engine = OnnxEngine(folders["mla", "concat"][0], threads=1)       # max_length 64
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has 70 tokens, more than this engine's maximum length 64"):
        engine.generate([[1] * 70])
    with pytest.raises(ValueError, match="together 70 exceed .* maximum length 64; lower max_new_tokens to at most 54"):
        engine.generate([[1] * 10], max_new_tokens=60)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        engine.generate([[1, 300]])
    with pytest.raises(ValueError, match="prompts must be"):
        engine.generate([])
    with pytest.raises(ValueError, match="stop must be"):
        engine.generate("the", stop=[""])
    with pytest.raises(ValueError, match="execution provider"):
        OnnxEngine(folders["mla", "concat"][0], providers=["NoSuchExecutionProvider"])
    assert engine.generate([[1, 2]], max_new_tokens=0).token_ids == [[]]


def test_kvcache_rejects_bad_sizes(folders):
    m = Manifest.read(folders["mla", "concat"][0])
    with pytest.raises(ValueError, match="batch and capacity"):
        KVCache(m.cache, 0, 8)


# -- packaging ------------------------------------------------------------------------------------
def test_generation_in_a_process_without_torch(folders):
    """The whole runtime path (load, verify, generate) in a fresh interpreter: torch never imported."""
    folder = folders["original", "concat"][0]
    code = ("import sys; from mla_pass.runtime import OnnxEngine; "
            f"r = OnnxEngine({str(folder)!r}, threads=1).generate(['the cat', 'hello'], max_new_tokens=4); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(r.token_ids)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[[")


@pytest.mark.slow
def test_incremental_decoder_on_smollm2_tokenizer():
    from tokenizers import Tokenizer

    from mla_pass import assets
    try:
        path = assets.smollm2_dir() / "tokenizer.json"
    except assets.AssetError as e:
        pytest.skip(f"SmolLM2-135M could not be fetched: {e}")
    tok = Tokenizer.from_file(str(path))
    text = "Hello, world! Café au lait coûte 3 €. 東京タワー 🗼 is tall.\n  Indented  line."
    ids = tok.encode(text).ids
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_cli_generate_streams_without_torch(folders, tokenizer):
    folder, spec = folders["mla", "concat"]
    code = ("import sys; from mla_pass.cli import main; "
            f"rc = main(['generate', {str(folder)!r}, '--prompt', 'the cat sat on', '--max-new-tokens', '6', "
            "'--threads', '1']); assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ids = tokenizer.encode("the cat sat on").ids
    want = tokenizer.decode(reference_greedy(spec, ids, 6))
    text, summary = proc.stdout.rsplit("\n", 2)[:2]
    assert text == "the cat sat on" + want
    assert summary.startswith("[6 tokens, ") and "KV cache 192 bytes/token (mla)" in summary   # 2 layers × (16 + 2·4) × 4 B


def test_cli_generate_reports_bad_folder(tmp_path):
    from mla_pass.cli import main
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
