"""Tiny random MoE checkpoints built locally with transformers (no network): the oracles of the parity tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = {
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def _configs():
    import transformers as tf

    return {
        # OLMoE: QK-norm over the whole projection; llama.cpp's olmoe needs n_kv == n_heads, HF allows GQA.
        "olmoe": tf.OlmoeConfig(
            **COMMON, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
            num_experts_per_tok=2, rms_norm_eps=1e-5,
        ),
        # Qwen2-MoE: QKV bias, shared expert with sigmoid gate, no top-k renormalization, head_dim != hidden/heads.
        "qwen2moe": tf.Qwen2MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=56,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6, num_experts_per_tok=3,
            decoder_sparse_step=1, norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        ),
        # Qwen3-MoE: per-head QK-norm, renormalized top-k, head_dim != hidden/heads.
        "qwen3moe": tf.Qwen3MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        ),
        # Mixtral: softmax-then-top-k with renormalization, GQA, head_dim != hidden/heads.
        "mixtral": tf.MixtralConfig(
            **COMMON, intermediate_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
            num_local_experts=4, num_experts_per_tok=2,
        ),
        # Granite-MoE: the four multipliers away from 1 (attention_multiplier != 1/sqrt(head_dim)), fused experts,
        # softmax over the top-k logits, an odd expert count; the shared variant adds an ungated shared MLP and ties
        # the embeddings (as the published checkpoints do).
        "granitemoe": tf.GraniteMoeConfig(
            **COMMON, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            num_local_experts=5, num_experts_per_tok=3, **GRANITE_SCALES,
        ),
        "granitemoeshared": tf.GraniteMoeSharedConfig(
            **{**COMMON, "tie_word_embeddings": True}, intermediate_size=40, shared_intermediate_size=56,
            num_attention_heads=4, num_key_value_heads=1, num_local_experts=7, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **GRANITE_SCALES,
        ),
    }


GRANITE_SCALES = {"embedding_multiplier": 3.0, "attention_multiplier": 0.07, "residual_multiplier": 0.6,
                  "logits_scaling": 2.5}


FAMILIES = ("olmoe", "qwen2moe", "qwen3moe", "mixtral")
GRANITE = ("granitemoe", "granitemoeshared")  # tests/test_granite.py


def build_tiny_model(family: str, out_dir: Path, seed: int = 0, **save_kwargs) -> Path:
    """Random-init a tiny model of `family`, with weights scaled up so routing and logits are not trivial."""
    import torch
    import transformers as tf

    cfg = _configs()[family]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)  # larger than HF's 0.02 init so logits and routing vary a lot
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **save_kwargs)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog " * 4, "to be or not to be that is the question"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    tok.save(str(out_dir / "tokenizer.json"))


# A Zephyr-style chat template for the tiny models: role markers, bos/eos strings, raise_exception, loop controls
# and whitespace control, i.e. what real templates use (the chat tests render it with edgemoe and transformers).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}"
    "{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def add_chat_template(model_dir: Path, template: str | list = CHAT_TEMPLATE, as_jinja_file: bool = False) -> Path:
    """Give a tiny checkpoint a tokenizer_config.json (bos/eos/pad strings) with a chat template, or the template in
    chat_template.jinja (the newer layout). template may also be a list of {"name", "template"} dicts."""
    import json

    model_dir = Path(model_dir)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if as_jinja_file:
        (model_dir / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return model_dir
