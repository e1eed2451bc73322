"""Training text sampled from the original model itself, for distillation.

Distillation on three books (fiction, verse, a play) drives the training KL far below the
held-out KL: the text, not the optimiser, is the limit (docs/quality.md). The teacher's own samples
are unlimited and in its distribution. ``generated_windows`` builds ``[N, L]`` token windows:

- "books" prompts: ``prefix`` real tokens from a random place in ``TRAINING_TEXTS`` (never the
  held-out ``lcet10.txt``), continued by sampling;
- "chat" prompts: an instruction from ``CHAT_PROMPTS`` in the tokenizer's chat template (plain
  "Question: … Answer:" when it has none), one prompt per batch, continued by sampling (the
  samples differ from the first sampled token on);
- "mix": batches alternate between the two.

Sampling is plain temperature sampling (1 = the teacher's own distribution, no top-k/top-p),
batched, with a KV cache for Hugging Face models (a full forward per token otherwise). Batch ``b``
draws from its own generator seeded by ``(seed, b)``, so the windows are a pure function of
(model, tokenizer, options, seed) and a longer request extends a shorter one.

Windows are cached under ``<cache>/selfgen/<key>.safetensors``, the key a hash of the model's
weights, the prompt token ids and the options other than the count; the file also holds each
batch's CPU and wall seconds, so a rerun generates nothing and still reports what the windows
cost. It is rewritten (atomically) after every batch: an interrupted generation resumes where
it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("books", "chat", "mix")
TEXT_KINDS = ("real", "generated", "mix")

# Instructions for the "chat" prompts: expository and conversational requests on varied topics,
# written for this module (nothing taken from the evaluation text).
CHAT_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation, and how do central banks respond?",
    "Describe the water cycle for a ten-year-old.",
    "Summarise the history of the printing press and its effects on Europe.",
    "Give me advice on preparing for a job interview.",
    "How does a computer store numbers in memory?",
    "Write a letter to a friend describing a trip to the mountains.",
    "What is photosynthesis and why does it matter?",
    "Compare trains and airplanes for travelling across a country.",
    "Explain what a database index is and when to use one.",
    "Write a poem about the sea at night.",
    "What should a city consider when planning public transport?",
    "Describe how vaccines train the immune system.",
    "Explain the rules of chess to a beginner.",
    "What were the consequences of the industrial revolution for workers?",
    "How do bees make honey?",
    "Write a product description for a durable hiking backpack.",
    "Explain the difference between weather and climate.",
    "How can a small business keep track of its expenses?",
    "Describe a busy market in a large city in the morning.",
    "What is the role of a museum in preserving culture?",
    "Explain how electricity reaches a house from a power plant.",
    "Write a dialogue between a teacher and a curious student about the stars.",
    "What are good habits for learning a new language?",
    "Explain how a bill becomes a law in a parliamentary system.",
    "Describe the life cycle of a butterfly.",
    "What are the advantages and risks of social media for teenagers?",
    "Explain what an algorithm is, with an everyday example.",
    "Write a report on the benefits of planting trees in cities.",
    "How did ancient sailors navigate without modern instruments?",
    "Explain how a search engine finds relevant pages.",
    "Write a short speech for the opening of a new school library.",
    "What is the difference between a virus and a bacterium?",
    "Describe the steps to bake a loaf of bread.",
    "Explain why the sky is blue.",
    "What makes a good scientific experiment?",
    "Write a review of an imaginary novel about time travel.",
    "How do governments collect and use census data?",
    "Explain the basics of how a car engine works.",
    "Describe the challenges of keeping old documents and recordings readable for future generations.",
    "Give an overview of how the internet grew from a research network.",
    "What are the main ideas of the theory of evolution?",
    "Write instructions for setting up a small vegetable garden.",
    "Explain how interest on a savings account works.",
    "Describe a thunderstorm from the point of view of a farmer.",
    "What is the purpose of peer review in academic publishing?",
    "Explain how maps represent a round earth on flat paper.",
)


@dataclass(frozen=True)
class SelfGenConfig:
    """Args:
        tokens: tokens wanted in total (whole windows, rounded up; prompts included).
        length: tokens per window.
        prompts: "books", "chat" or "mix" (batches alternate, books first).
        prefix: real tokens that start each "books" window.
        batch_size: windows sampled together (decoding is cheaper per token in bigger batches:
            9 vs 19 ms/token at 64 vs 16 on SmolLM2-135M, 1 CPU thread).
        temperature: sampling temperature (1: the teacher's own distribution).
        seed: the windows are a pure function of it (with the model, tokenizer and the rest).
    """
    tokens: int = 100_000
    length: int = 512
    prompts: str = "mix"
    prefix: int = 32
    batch_size: int = 64
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1 (how many tokens of generated text to make), got {self.tokens}")
        if self.length < 2:
            raise ValueError(f"length must be >= 2 tokens per window, got {self.length}")
        if self.prompts not in PROMPT_KINDS:
            raise ValueError(f"prompts must be one of {PROMPT_KINDS}, got {self.prompts!r}")
        if not 1 <= self.prefix < self.length:
            raise ValueError(f"prefix must be >= 1 and < length ({self.length}) so that something is sampled, "
                             f"got {self.prefix}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def windows(self) -> int:
        return math.ceil(self.tokens / self.length)


@dataclass
class GeneratedText:
    """Args:
        tokens: the windows ``[N, length]`` (int64).
        sampled_tokens: how many of their tokens were sampled (the rest are prompts).
        cpu_seconds / wall_seconds: what generating these windows cost (this call or an earlier one).
        generated_now: windows sampled by this call (0 when all came from the cache).
        path: the cache file.
    """
    tokens: torch.Tensor
    sampled_tokens: int
    cpu_seconds: float
    wall_seconds: float
    generated_now: int
    path: Path | None


def generated_windows(model, tokenizer, config: SelfGenConfig | None = None, *, cache_dir=None,
                      texts=None, progress: bool = True, use_cache: bool = True) -> GeneratedText:
    """Windows of text sampled from ``model`` (the original), cached on disk.

    Args:
        model: the original model (a Hugging Face causal LM, or a module ``ids -> logits``).
        tokenizer: its tokenizer (prompts are tokenized with it).
        config: a ``SelfGenConfig``.
        cache_dir: the mla-pass cache folder (default ``~/.cache/mla-pass``); texts come from it too.
        texts: names of the bundled texts the "books" prefixes come from (default
            ``evaluate.TRAINING_TEXTS``); the held-out text is refused.
        use_cache: read and write ``<cache>/selfgen``; False: generate in memory only.

    Example:
        >>> gen = generated_windows(model, tok, SelfGenConfig(tokens=50_000))        # doctest: +SKIP
        >>> distill(mla, model, gen.tokens, DistillConfig(steps=None), max_seconds=600)  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from .. import assets
    from .windows import HELD_OUT_TEXT, TRAINING_TEXTS

    config = config or SelfGenConfig()
    if not isinstance(config, SelfGenConfig):
        raise TypeError(f"config must be a SelfGenConfig, got {type(config).__name__}")
    if config.batch_size > config.windows:     # a small request: no batch rows sampled only to be cut
        config = replace(config, batch_size=config.windows)
    texts = tuple(TRAINING_TEXTS if texts is None else texts)
    if HELD_OUT_TEXT in texts:
        raise ValueError(f"{HELD_OUT_TEXT} is the held-out evaluation text: prompts must not come from it")
    if not texts and config.prompts != "chat":
        raise ValueError("'books' prompts need at least one text (texts=...)")
    vocab = _vocab_size(model)
    books = [] if config.prompts == "chat" else _book_tokens(tokenizer, texts, config, cache_dir)
    chats = [] if config.prompts == "books" else [_chat_ids(tokenizer, p, config.length) for p in CHAT_PROMPTS]
    for ids in books + chats:
        if int(ids.max()) >= vocab:
            raise ValueError(f"the tokenizer gives token id {int(ids.max())} but the model has {vocab} tokens: "
                             "pass the model's own tokenizer")

    options = {k: v for k, v in asdict(config).items() if k != "tokens"}     # a longer request extends the file
    key = _key(model, options, books, chats)
    folder = Path(cache_dir or assets.default_cache_dir()) / "selfgen"
    path = folder / f"{key}.safetensors"
    windows, cpu, wall = [], [], []
    if use_cache and path.is_file():
        saved = load_file(str(path))
        windows, cpu, wall = list(saved["windows"].split(config.batch_size)), saved["cpu"].tolist(), saved["wall"].tolist()
        logger.info("self-generated text: %d windows cached in %s", saved["windows"].shape[0], path)
    n_batches = math.ceil(config.windows / config.batch_size)
    todo = range(len(windows), n_batches)
    generated_now = 0
    if todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_batches, initial=len(windows), desc="sampling the original", unit="batch",
                   disable=not progress)
        for b in todo:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + b)
            prompt = _batch_prompt(b, config, books, chats, g)
            windows.append(_sample(model, prompt, config.length, config.temperature, g))
            cpu.append(time.process_time() - cpu0)
            wall.append(time.perf_counter() - wall0)
            generated_now += config.batch_size
            if use_cache:
                _save(path, windows, cpu, wall, options)
            bar.update(1)
        bar.close()
    tokens = torch.cat(windows[:n_batches])[: config.windows]
    kept = [min(config.batch_size, config.windows - b * config.batch_size) for b in range(n_batches)]
    sampled = sum(k * (config.length - _prompt_length(b, config, chats)) for b, k in enumerate(kept))
    share = tokens.shape[0] / (n_batches * config.batch_size)        # the last batch may be cut: its share
    return GeneratedText(tokens=tokens, sampled_tokens=sampled,
                         cpu_seconds=sum(cpu[:n_batches]) * share, wall_seconds=sum(wall[:n_batches]) * share,
                         generated_now=generated_now, path=path if use_cache else None)


def distillation_text(kind: str, model, tokenizer, *, length: int = 512, generated: SelfGenConfig | None = None,
                      real_windows: int | None = None, cache_dir=None,
                      progress: bool = True) -> tuple[torch.Tensor, GeneratedText | None]:
    """Training windows for ``distill``: "real" (``quality.windows.training_windows``: the three books,
    at most ``real_windows`` of them), "generated" (``generated_windows``) or "mix" (both,
    interleaved window by window while both last). Returns (windows [N, length], the generation
    report or None)."""
    from .windows import training_windows

    if kind not in TEXT_KINDS:
        raise ValueError(f"the distillation text must be one of {TEXT_KINDS}, got {kind!r}")
    if generated is not None and generated.length != length:
        raise ValueError(f"generated windows have {generated.length} tokens but the training windows {length}: "
                         "use the same length")
    real = training_windows(tokenizer, real_windows, length, cache_dir) if kind != "generated" else None
    if kind == "real":
        return real, None
    gen = generated_windows(model, tokenizer, generated or SelfGenConfig(length=length), cache_dir=cache_dir,
                            progress=progress)
    if kind == "generated":
        return gen.tokens, gen
    return interleave(real, gen.tokens), gen


# -- helpers ------------------------------------------------------------------------------------
def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` and ``b`` alternately while both last, then the rest of the longer."""
    rows = [t[i] for i in range(max(len(a), len(b))) for t in (a, b) if i < len(t)]
    return torch.stack(rows)


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return int(emb.num_embeddings)


def _book_tokens(tokenizer, texts, config: SelfGenConfig, cache_dir) -> list[torch.Tensor]:
    from .. import assets
    out = []
    for name in texts:
        ids = tokenizer(assets.read_text(name, cache_dir), return_tensors="pt").input_ids[0].long()
        if len(ids) < config.prefix:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than the prefix of {config.prefix}")
        out.append(ids)
    return out


def _chat_ids(tokenizer, prompt: str, length: int) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"Question: {prompt}\nAnswer:"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].long()
    if len(ids) >= length:
        raise ValueError(f"a chat prompt takes {len(ids)} tokens, not less than the window length {length}: "
                         "use longer windows or 'books' prompts")
    return ids


def _is_chat(b: int, config: SelfGenConfig) -> bool:
    return config.prompts == "chat" or (config.prompts == "mix" and b % 2 == 1)


def _chat_prompt(b: int, config: SelfGenConfig, chats) -> torch.Tensor:
    """The instruction of chat batch ``b`` (under "mix" every other batch is a chat one)."""
    return chats[(b // 2 if config.prompts == "mix" else b) % len(chats)]


def _prompt_length(b: int, config: SelfGenConfig, chats) -> int:
    return len(_chat_prompt(b, config, chats)) if _is_chat(b, config) else config.prefix


def _batch_prompt(b: int, config: SelfGenConfig, books, chats, g: torch.Generator) -> torch.Tensor:
    """[batch, P] prompt ids of batch ``b``: one chat prompt repeated, or real prefixes."""
    if _is_chat(b, config):
        return _chat_prompt(b, config, chats)[None].expand(config.batch_size, -1).clone()
    rows = []
    for _ in range(config.batch_size):
        text = books[int(torch.randint(len(books), (1,), generator=g))]
        start = int(torch.randint(len(text) - config.prefix + 1, (1,), generator=g))
        rows.append(text[start:start + config.prefix])
    return torch.stack(rows)


@torch.no_grad()
def _sample(model, prompt: torch.Tensor, length: int, temperature: float, g: torch.Generator) -> torch.Tensor:
    """Continue ``prompt`` [B, P] to [B, length] by temperature sampling."""
    from ..frontend.capture import is_hf_model
    from .evaluate import logits_of

    device = next(model.parameters()).device
    seq = prompt.to(device)
    hf = is_hf_model(model)
    past = None
    while seq.shape[1] < length:
        if hf:
            # a preallocated cache: ~1.5× faster decode than concatenating (SmolLM2, CPU, batch 16)
            if past is None:
                from transformers import StaticCache
                past = StaticCache(config=model.config, max_cache_len=length)
                step = seq
            else:
                step = seq[:, -1:]
            at = torch.arange(seq.shape[1] - step.shape[1], seq.shape[1], device=device)
            logits = model(input_ids=step, past_key_values=past, use_cache=True, cache_position=at).logits[:, -1]
        else:                                 # no cache to reuse: the whole sequence again
            logits = logits_of(model, seq)[:, -1]
        probs = (logits.float() / temperature).softmax(-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=g)
        seq = torch.cat([seq, nxt.to(device)], dim=1)
    return seq.cpu().long()


def _key(model, options: dict, books, chats) -> str:
    h = hashlib.sha256(b"selfgen-v2")       # bump when the sampler's numerics change
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    for ids in books + chats:            # the tokenizer's view of the prompts
        h.update(ids.numpy().tobytes())
    return h.hexdigest()[:24]


def _save(path: Path, windows, cpu, wall, options) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"windows": torch.cat(windows), "cpu": torch.tensor(cpu, dtype=torch.float64),
               "wall": torch.tensor(wall, dtype=torch.float64)}, str(tmp), metadata={"options": json.dumps(options)})
    os.replace(tmp, path)
