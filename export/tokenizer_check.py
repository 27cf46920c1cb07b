"""The source's tokenizer, loaded and round-tripped once at export: a container never carries one that cannot load,
that names token ids beyond the model's embedding rows, or that does not give back the text it encoded."""

from __future__ import annotations

from edgemoe.errors import FormatError

from .json_input import parse_json

# Plain ASCII every real tokenizer (byte-level BPE, SentencePiece with byte fallback) encodes and decodes exactly.
ROUND_TRIP_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


def check_tokenizer(data: bytes, vocab: int, where: str) -> bytes:
    """Return `data` (tokenizer.json bytes) once it has loaded with the `tokenizers` library, its ids fit in `vocab`
    and ROUND_TRIP_TEXT survives encode -> decode; otherwise a FormatError naming `where`."""
    parse_json(data, where)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise FormatError("checking the tokenizer needs the tokenizers library: pip install tokenizers") from None
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the library raises plain Exception with serde's message
        raise FormatError(f"{where}: not a tokenizer the tokenizers library can load "
                          f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    ids = tok.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= vocab:
        raise FormatError(f"{where}: token id {top} is beyond the model's {vocab} embedding rows (vocab_size); "
                          "this tokenizer belongs to another model")
    try:
        enc = tok.encode(ROUND_TRIP_TEXT, add_special_tokens=False).ids
        back = tok.decode(enc, skip_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - a tokenizer whose pieces fail at run time
        raise FormatError(f"{where}: the tokenizer fails on plain text ({str(e)[:160]})") from None
    if not enc or back.strip() != ROUND_TRIP_TEXT:
        raise FormatError(f"{where}: the tokenizer does not round-trip plain text: {ROUND_TRIP_TEXT!r} decodes back "
                          f"as {back[:80]!r}")
    return data
