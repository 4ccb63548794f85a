"""The CLIP byte-level BPE tokenizer (OpenAI CLIP's vocabulary: 49,408 tokens).

Token ids equal open_clip's `SimpleTokenizer` (checked in tests on a varied corpus). Text is cleaned as the
reference does: ftfy, HTML unescaped twice, whitespace collapsed, lower-cased. Each text becomes
[SOT] + tokens + [EOT], zero-padded to the context length; a text that is too long is truncated with EOT kept
as the last token.

The merges file (`assets/bpe_simple_vocab_16e6.txt.gz`) is OpenAI's, released under the MIT licence with CLIP.
"""

from __future__ import annotations

import copy
import functools
import gzip
import html
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(__file__), 'assets', 'bpe_simple_vocab_16e6.txt.gz')
SOT_TOKEN, EOT_TOKEN = '<start_of_text>', '<end_of_text>'
NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable unicode characters (no whitespace or control chars)."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  # Insertion order matters: it is the order of the first 256 vocabulary entries.
  mapping = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in mapping]
  mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
  return mapping


def clean_text(text: str) -> str:
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return ' '.join(text.split()).lower()


class SimpleTokenizer:
  """CLIP BPE tokenizer. `tokenizer(texts)` -> int32 array [len(texts), context_length]."""

  def __init__(self, bpe_path: str = DEFAULT_BPE_PATH, context_length: int = 77, cache_size: int = 1 << 18):
    with gzip.open(bpe_path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + '</w>' for c in byte_chars] + [''.join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.sot_token_id = self.encoder[SOT_TOKEN]
    self.eot_token_id = self.encoder[EOT_TOKEN]
    self.vocab_size = len(self.encoder)
    self.context_length = context_length
    # Special tokens written in the text are kept whole, as in the reference.
    self.pattern = regex.compile(
        rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
        regex.IGNORECASE)
    self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

  def _bpe(self, word: str) -> list[str]:
    """Merges the symbols of one pre-tokenised word, lowest-ranked pair first, until no pair is in the table."""
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    while len(symbols) > 1:
      first, second = min(zip(symbols, symbols[1:]), key=lambda p: self.bpe_ranks.get(p, NUM_MERGES))
      if (first, second) not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
    if word in (SOT_TOKEN, EOT_TOKEN):
      return (self.encoder[word],)
    chars = ''.join(self.byte_encoder[b] for b in word.encode('utf-8'))
    return tuple(self.encoder[s] for s in self._bpe(chars))

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT or padding."""
    ids: list[int] = []
    for word in self.pattern.findall(clean_text(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    text = ''.join(self.decoder[int(i)] for i in ids)
    return bytearray(self.byte_decoder[c] for c in text).decode('utf-8', errors='replace').replace('</w>', ' ')

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    context_length = context_length or self.context_length
    if context_length < 2:
      raise ValueError(f'context_length must be at least 2 (SOT and EOT), got {context_length}')
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f'texts[{row}] is {type(text).__name__}, expected str')
      ids = [self.sot_token_id] + self.encode(text)[:context_length - 2] + [self.eot_token_id]
      result[row, :len(ids)] = ids
    return result


@functools.lru_cache(maxsize=None)
def _default_tokenizer() -> SimpleTokenizer:
  return SimpleTokenizer()


def get_tokenizer(name: str | None = None, context_length: int | None = None) -> SimpleTokenizer:
  """The tokenizer for model `name` (every EVA-CLIP model uses CLIP's BPE); context length from its spec."""
  from eva_clip_jax.models.registry import get_model_spec  # local: keeps `import tokenizer` light

  if context_length is None:
    context_length = get_model_spec(name).text.context_length if name else 77
  tokenizer = _default_tokenizer()
  if context_length == tokenizer.context_length:
    return tokenizer
  resized = copy.copy(tokenizer)  # shares the vocabulary tables and the word cache
  resized.context_length = context_length
  return resized


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  return _default_tokenizer()(texts, context_length)
