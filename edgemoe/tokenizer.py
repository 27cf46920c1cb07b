"""The tokenizer embedded in a container, through the `tokenizers` library."""

from __future__ import annotations

from .errors import InvalidFileError


class Tokenizer:
    def __init__(self, tokenizer_json: bytes, where: str = "the container"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise InvalidFileError(f"{where}: the embedded tokenizer.json cannot be loaded ({e}); re-export the "
                                   f"model") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (<s>, </s>, <|im_end|>, ...), which never stand for plain text."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
