"""The demo tokenizer: training is deterministic, files load in transformers, ids and roles, chat
template, round trip, and the wrapper's errors."""

import json
import os

import pytest

from dllm_jax.tokenizer import load_tokenizer
from dllm_jax.train.corpus import load_corpus
from dllm_jax.train.tokenizer_train import (CHAT_TEMPLATE, SPECIAL_TOKENS, save_tokenizer,
                                            train_bpe, train_demo_tokenizer)

DEMO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "dllm_jax", "assets", "demo")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """A freshly trained demo tokenizer (the same recipe and data as the bundled one)."""
  d = str(tmp_path_factory.mktemp("tok"))
  train_demo_tokenizer(d)
  return d


@pytest.fixture(scope="module")
def tok(tok_dir):
  return load_tokenizer(tok_dir)


def test_training_is_deterministic_and_matches_bundle(tok_dir, tmp_path):
  train_demo_tokenizer(str(tmp_path))
  for f in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(tok_dir, f), "rb") as a, open(tmp_path / f, "rb") as b:
      assert a.read() == b.read(), f
  bundled = os.path.join(DEMO_DIR, "tokenizer.json")
  if os.path.isfile(bundled):  # the bundled model was trained with exactly this tokenizer
    with open(bundled, "rb") as a, open(os.path.join(tok_dir, "tokenizer.json"), "rb") as b:
      assert a.read() == b.read()


def test_round_trip_heldout(tok):
  docs = load_corpus("heldout")
  assert len(docs) > 50
  for d in docs:
    ids = tok.encode(d)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == d
  # Compression sanity: byte-level BPE with ~3k merges gives > 3 characters per token.
  text = "\n".join(docs[:40])
  assert len(text) / len(tok.encode(text)) > 3.0


def test_special_token_ids_and_roles(tok, tok_dir):
  assert tok.vocab_size == 3072
  assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.bos_token_id,
          tok.eot_token_id) == (0, 1, 2, 3, 4)
  for i, t in enumerate(SPECIAL_TOKENS):
    assert tok.token_id(t) == i
    assert tok.encode(t) == [i]  # a special token is one id, never split
  assert tok.token_id("<|no such token|>") is None
  assert tok.decode([2, 1, 4]) == ""
  assert tok.decode([2, 1, 4], skip_special_tokens=False) == "<|mask|><|eos|><|eot|>"
  # No BOS / EOS is added to plain text.
  ids = tok.encode("Return the list.")
  assert ids[0] not in (0, 1, 3) and ids[-1] not in (0, 1)
  with open(os.path.join(tok_dir, "tokenizer_config.json")) as fh:
    cfg = json.load(fh)
  assert cfg["eot_token"] == "<|eot|>" and cfg["add_bos_token"] is False


def test_chat_template(tok):
  prompt = tok.apply_chat_template("What is a list?")
  assert prompt == "<|bos|><|user|>\nWhat is a list?<|eot|><|assistant|>\n"
  conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
  assert tok.apply_chat_template(conv) == (
      "<|bos|><|system|>\nBe brief.<|eot|><|user|>\nHi<|eot|><|assistant|>\nHello.<|eot|>"
      "<|user|>\nBye<|eot|><|assistant|>\n")
  ids = tok.encode_chat("What is a list?")
  assert ids[:2] == [3, 5] and ids.count(3) == 1
  assert ids[-2] == 6 and tok.decode(ids[-1:]) == "\n"
  assert tok.decode(ids, skip_special_tokens=False) == prompt


def test_transformers_loads_the_files(tok_dir):
  from transformers import PreTrainedTokenizerFast
  hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
  assert hf.mask_token_id == 2 and hf.eos_token_id == 1 and hf.pad_token_id == 0
  assert hf.chat_template == CHAT_TEMPLATE
  assert "<|eot|>" in hf.all_special_tokens
  # The raw file also loads with explicit roles (PreTrainedTokenizerFast(tokenizer_file=...)).
  raw = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"),
                                mask_token="<|mask|>", eos_token="<|eos|>", pad_token="<|pad|>")
  assert raw.encode("def f(x):", add_special_tokens=False) == hf.encode("def f(x):")


def test_same_ids_text_and_chat_as_transformers(tok, tok_dir):
  """Our tokenizers-based wrapper against transformers' PreTrainedTokenizerFast (the oracle) on
  the held-out corpus, special tokens, unicode, odd whitespace and chat conversations."""
  from transformers import PreTrainedTokenizerFast
  hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
  texts = load_corpus("heldout")[:40] + [
      "", " ", "\n\n\t x", "héllo wörld — ✓ 日本語 🙂", "<|mask|>a<|eos|>b<|eot|>", "  def f(x):  "]
  for t in texts:
    for special in (False, True):
      assert tok.encode(t, add_special_tokens=special) == hf.encode(t, add_special_tokens=special)
  ids = [i for t in texts for i in hf.encode(t, add_special_tokens=False)] + list(range(12))
  for skip in (False, True):
    assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
        ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
  assert tok.vocab_size == len(hf)
  assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
      hf.mask_token_id, hf.eos_token_id, hf.pad_token_id, hf.bos_token_id)
  for conv in ([{"role": "user", "content": "What is a list?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "é\n"}]):
    assert tok.apply_chat_template(conv) == hf.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True)


def test_plain_encoding_never_imports_transformers(tok_dir):
  import subprocess
  import sys
  code = (f"import sys; from dllm_jax.tokenizer import load_tokenizer; t = load_tokenizer({tok_dir!r}); "
          "t.decode(t.encode('def f(x):')); print('transformers' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_eot_fallback_by_family_name(tmp_path):
  """A tokenizer whose config names no eot token finds LLaDA's <|eot_id|> by name."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(["hello world"] * 4, trainer=trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  t.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>"}))
  tok = load_tokenizer(tmp_path)
  assert (tok.eos_token_id, tok.mask_token_id, tok.eot_token_id) == (0, 1, 2)
  assert tok.pad_token_id == 0  # falls back to eos
  with pytest.raises(ValueError, match="chat_template"):
    tok.apply_chat_template("hi")


def test_errors_for_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError) as e:
    load_tokenizer(tmp_path)
  assert "\n" not in str(e.value)
  (tmp_path / "tokenizer.json").unlink()
  save_tokenizer(train_bpe(["some text here"] * 3, 300), str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text("[1, 2")
  with pytest.raises(ValueError, match="not valid JSON"):
    load_tokenizer(tmp_path)
