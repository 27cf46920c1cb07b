"""Greedy tokens of one model in edgemoe's C engine and in llama.cpp (the family tests' GGUF check)."""

import numpy as np

import edgemoe


def greedy_tokens(emoe_path, gguf_path, prompt: list[int], n: int, make_llama) -> tuple[list[int], list[int]]:
    """(edgemoe's, llama.cpp's) n greedy tokens after `prompt`; make_llama: Llama or a wrapper with its arguments."""
    with edgemoe.load(emoe_path, engine="c") as m:
        logits = m._engine.prefill(prompt)
        ours = []
        for _ in range(n):
            ours.append(int(np.argmax(logits)))
            logits = m._engine.decode(ours[-1])
    llm = make_llama(model_path=str(gguf_path), n_ctx=64, n_threads=2, type_k=0, type_v=0, verbose=False)
    try:
        theirs = [int(t) for t, _ in zip(llm.generate(prompt, temp=0.0, top_k=1), range(n))]
    finally:
        llm.close()
    return ours, theirs
