"""Shared fixtures: tiny models built from a config and a character-level tokenizer built
in code — nothing is downloaded."""

import os
import random

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
WORDS = "the lord said unto them and it came to pass that he went into the city of david with all his people".split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(seed: int = 0, vocab_size: int = 3 + len(CHARS), layers: int = 2, hidden: int = 32,
               **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
        initializer_range=0.1,  # peakier outputs than the default 0.02: a clearer distillation signal
        **config,
    )
    return LlamaForCausalLM(config)


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(n)]


def perturb(model, scale: float = 0.5, seed: int = 1):
    """Add Gaussian noise of ``scale`` × each weight matrix's own standard deviation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return model


def write_tiny_inputs(root, n_train: int = 300, n_eval: int = 80):
    """A tiny model + tokenizer folder (``root/model``) and ``train.txt`` / ``eval.txt`` texts."""
    make_model().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    for name, n, seed in [("train", n_train, 1), ("eval", n_eval, 2)]:
        (root / f"{name}.txt").write_text("\n".join(make_texts(n, seed=seed)))
    return root


def cpu_args(**kw) -> dict:
    """Arguments every CPU test run needs (TRL defaults bf16 and gradient checkpointing on)."""
    base = dict(
        use_cpu=True, bf16=False, fp16=False, report_to=[], disable_tqdm=True, save_strategy="no",
        dataloader_num_workers=0, seed=0, logging_steps=1,
    )
    base.update(kw)
    return base


def allocation_trace(fn) -> tuple[int, list[int]]:
    """Run ``fn()`` under torch's profiler and read its allocator events: the peak of bytes allocated
    above what was live before, and the size of every allocation in order (an allocation count that
    works on CPU, where no device memory statistics exist)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, [e.nbytes() for e in events if e.nbytes() > 0]
