"""llama.cpp's names for what edgemoe describes: architecture names, tokenizer pre-tokenizer names, and the layout
llama.cpp hard-codes for SmallThinker. One table for both directions: the GGUF writer (gguf_export) reads it forwards,
the GGUF reader (gguf_reader) backwards."""

# edgemoe family -> llama.cpp architecture name
LLAMA_CPP_ARCH = {
    "olmoe": "olmoe",
    "qwen2moe": "qwen2moe",
    "qwen3moe": "qwen3moe",
    "mixtral": "llama",
    "smallthinker": "smallthinker",
    "granitemoe": "granitemoe",  # both granitemoe and granitemoeshared (llama.cpp runs the shared MLP when present)
    "glm4moe": "glm4moe",
    "ernie4_5moe": "ernie4_5-moe",
    "gptoss": "gpt-oss",
    "qwen35moe": "qwen35moe",  # its tensor names and layouts: gguf_qwen35.py
    "lfm2moe": "lfm2moe",
    "gemma4": "gemma4",
    "deepseek2": "deepseek2",  # DeepSeek-V2 and V3 (MLA): attn_kv_b is written split, as attn_k_b / attn_v_b
}

# Container names llama.cpp spells differently for one architecture: (arch, container suffix) -> GGUF suffix.
# (glm4moe and gpt-oss read the pre-FFN RMSNorm, edgemoe's ffn_norm, as `post_attention_norm`.)
GGUF_RENAMES = {("glm4moe", ".ffn_norm.weight"): ".post_attention_norm.weight",
                ("gpt-oss", ".ffn_norm.weight"): ".post_attention_norm.weight",
                ("lfm2moe", "output_norm.weight"): "token_embd_norm.weight"}  # LFM2's final norm
# llama.cpp's gpt-oss makes even layers sliding-window (swa pattern 2), hard-codes the clamped SwiGLU's alpha and
# limit, and always floors/ceils YaRN's correction range.
GPT_OSS_SWIGLU = (1.702, 7.0)


def gguf_tensor_name(arch: str, name: str) -> str:
    """llama.cpp's name of a container tensor (they agree except where an arch renames one)."""
    for (a, suffix), new in GGUF_RENAMES.items():
        if a == arch and name.endswith(suffix):
            return name[: -len(suffix)] + new
    return name

# Byte-level BPE pre-tokenizer regexes (as tokenizer.json spells them) -> llama.cpp `tokenizer.ggml.pre` names.
SPLIT_REGEX_PRE = {
    # Qwen2 / Qwen2.5 / Qwen3 / SmallThinker (single digits)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # Llama 3 (digits in groups of up to three)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}

# llama.cpp's `smallthinker` hard-codes its hybrid layout: with `attention.sliding_window` present, layers
# i % 4 != 0 use sliding-window attention with a window of 4096 (the key's value is not used) and layers i % 4 == 0
# use full attention without RoPE; without the key, every layer uses RoPE and full attention.
SMALLTHINKER_SWA_PERIOD = 4
SMALLTHINKER_SWA_WINDOW = 4096
