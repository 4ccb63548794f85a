"""The CLIP BPE tokenizer: ids equal open_clip's on a varied corpus; truncation, padding, speed-relevant API."""

import numpy as np
import pytest

import eva_clip_jax as ec
from eva_clip_jax.tokenizer import SimpleTokenizer

CORPUS = [
    'a photo of a cat', 'A PHOTO OF A CAT', '', '   ', 'x',
    'Héllo wörld! Crème brûlée, naïve café, São Paulo, Ærøskøbing',
    'emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇯🇵🇫🇷',
    '日本語のテキスト、中文句子，한국어 문장, русский текст, ελληνικά, עברית, العربية, हिन्दी',
    "don't won't they're I've we'll she'd it's",
    'punctuation!!! ??? ... --- ((brackets)) [x] {y} <z> @#$%^&*_+=|\\/~`',
    'numbers 12345 3.14159 1,000,000 2nd 0x1F 1e-6',
    '&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#39;',
    'mojibake: schÃ¶n, â€œquotesâ€\x9d',
    'tabs\tand\nnewlines\r\n  and   runs   of spaces',
    'special tokens in text <start_of_text> and <END_OF_TEXT>',
    'a ' * 100, 'supercalifragilisticexpialidocious ' * 10, 'z' * 400,
    'The quick brown fox jumps over the lazy dog. ' * 8,
]


@pytest.fixture(scope='module')
def reference():
  open_clip = pytest.importorskip('open_clip')
  return open_clip.get_tokenizer('EVA02-B-16')


def test_ids_equal_open_clip(reference):
  ours = ec.tokenize(CORPUS)
  theirs = reference(CORPUS).numpy()
  for text, a, b in zip(CORPUS, ours, theirs):
    np.testing.assert_array_equal(a, b, err_msg=repr(text[:60]))


def test_ids_equal_open_clip_at_other_context_lengths(reference):
  for length in (16, 32):
    np.testing.assert_array_equal(ec.tokenize(CORPUS, length), reference(CORPUS, context_length=length).numpy())


def test_special_ids_and_layout():
  tok = SimpleTokenizer()
  assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407
  ids = tok(['a photo of a cat'])
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  row = ids[0].tolist()
  end = row.index(49407)
  assert row[0] == 49406 and all(t == 0 for t in row[end + 1:])
  assert tok.decode(row[1:end]).strip() == 'a photo of a cat'


def test_truncation_keeps_eot_last():
  ids = ec.tokenize(['word ' * 200], 77)[0]
  assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()


def test_get_tokenizer_uses_the_models_context_length():
  assert ec.get_tokenizer('EVA02-CLIP-L-14')(['hi']).shape == (1, 77)
  assert ec.get_tokenizer('tiny')(['hi']).shape == (1, 32)
  with pytest.raises(ValueError, match='at least 2'):
    ec.tokenize(['hi'], 1)
  with pytest.raises(TypeError, match='expected str'):
    ec.tokenize(['ok', None])
