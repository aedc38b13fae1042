"""A caption tokenizer that works offline: byte-level BPE trained on the training captions, or a local file.

CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020, Sec. 2.4) uses a lower-cased byte-pair
encoding (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909) with start and end tokens around
each caption, sequences capped at 76 tokens plus one. Here the BPE is trained by Hugging Face's
``tokenizers`` on the training split's captions (a fraction of a second for Flickr8k, tens of seconds
for millions of captions), so nothing is fetched from a hub. Any ``tokenizer.json`` on disk
(for example CLIP's own, saved once where there is a network) can be used instead.

Token rows are right-padded with ``-1``: the text tower needs no tokenizer-specific pad id, and
the end token of each row is its last non-negative entry.
"""

import torch

PAD = -1
SPECIAL = ("<pad>", "<sot>", "<eot>")


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` that adds start/end tokens; encodes batches to padded id tensors.

    Build one with :meth:`train` (from captions) or :meth:`from_file` / :meth:`from_str` (saved JSON).

    Example:
        >>> tok = CaptionTokenizer.train(["a dog runs on the grass", "a man rides a bike"], vocab_size=300)
        >>> ids = tok.encode(["a dog", "a bike on the grass"], context_length=8)
        >>> ids.shape, tok.tokenizer.id_to_token(ids[0, 1].item()), tok.tokenizer.id_to_token(ids[0, 2].item())
        (torch.Size([2, 8]), 'Ġa', 'Ġdog')
        >>> ids[0].tolist() == [tok.token_id("<sot>"), ids[0, 1], ids[0, 2], tok.token_id("<eot>")] + [-1] * 4
        True
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, captions: list[str], vocab_size: int = 4096) -> "CaptionTokenizer":
        """Train a lower-cased byte-level BPE of at most ``vocab_size`` tokens (every byte is one: no unknowns)."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(SPECIAL):
            raise ValueError(f"data.vocab_size must be at least {len(alphabet) + len(SPECIAL)} (the 256 bytes and "
                             f"{len(SPECIAL)} special tokens); got {vocab_size}. CLIP uses 49408.")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), initial_alphabet=alphabet,
                                      show_progress=False)
        tok.train_from_iterator(captions, trainer)
        sot, eot = (tok.token_to_id(t) for t in SPECIAL[1:])
        tok.post_processor = processors.TemplateProcessing(single="<sot> $A <eot>",
                                                           special_tokens=[("<sot>", sot), ("<eot>", eot)])
        return cls(tok)

    @classmethod
    def from_file(cls, path: str) -> "CaptionTokenizer":
        """Load a ``tokenizer.json`` (Hugging Face format); its post-processor should add start/end tokens."""
        import os

        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tokenizer file at {os.path.abspath(path)!r}. Set data.tokenizer to a "
                                    "tokenizer.json, or leave it empty to train a BPE on the training captions.")
        return cls(Tokenizer.from_file(path))

    @classmethod
    def from_str(cls, json_text: str) -> "CaptionTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(json_text))

    def to_str(self) -> str:
        """The tokenizer as JSON text (stored in CLIP checkpoints, so evaluation uses the same one)."""
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        """``(N, context_length)`` int64 ids, right-padded with -1; longer captions are cut before the end token."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens); got {context_length}.")
        self.tokenizer.enable_truncation(max_length=context_length)
        self.tokenizer.no_padding()
        out = torch.full((len(texts), context_length), PAD, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            out[i, :len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
        return out
