"""Train the demo model's byte-level BPE on the committed train split and save it in HF layout.

Writes ``tokenizer.json`` (a ``tokenizers`` BPE) and ``tokenizer_config.json`` (special-token roles
and a Jinja chat template) loadable with ``transformers.PreTrainedTokenizerFast``. Training is
deterministic: the same corpus and vocab size give byte-identical files.

Special tokens take the first ids, in this order: pad 0, eos 1, mask 2, bos 3, eot 4, user 5,
assistant 6, system 7.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOS, MASK, BOS, EOT = "<|pad|>", "<|eos|>", "<|mask|>", "<|bos|>", "<|eot|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, EOS, MASK, BOS, EOT, USER, ASSISTANT, SYSTEM)
DEFAULT_VOCAB_SIZE = 3072

# <|bos|>[<|system|>\n{sys}<|eot|>](<|user|>\n{msg}<|eot|>|<|assistant|>\n{msg}<|eot|>)*
# then <|assistant|>\n as the generation prompt. The same shape as LLaDA's template, with our markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|eot|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|eot|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|eot|>' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
  """Byte-level BPE (no normaliser, no prefix space: decode(encode(x)) == x for any text)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def tokenizer_config(model_max_length: int = 512) -> dict:
  return {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "mask_token": MASK,
      "unk_token": None,
      # Our wrapper reads the end-of-turn role from here; HF keeps it as an extra special token.
      "eot_token": EOT,
      "additional_special_tokens": [EOT, USER, ASSISTANT, SYSTEM],
      "add_bos_token": False, "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": model_max_length,
      "chat_template": CHAT_TEMPLATE,
  }


def save_tokenizer(tok: Tokenizer, out_dir: str, *, model_max_length: int = 512) -> list[str]:
  """Write tokenizer.json + tokenizer_config.json; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  p_tok = os.path.join(out_dir, "tokenizer.json")
  tok.save(p_tok, pretty=False)
  p_cfg = os.path.join(out_dir, "tokenizer_config.json")
  with open(p_cfg, "w", encoding="utf-8") as fh:
    json.dump(tokenizer_config(model_max_length), fh, indent=2, ensure_ascii=False)
    fh.write("\n")
  return [p_tok, p_cfg]


def train_demo_tokenizer(out_dir: str, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         model_max_length: int = 512) -> list[str]:
  """Train on the committed train split and save in HF layout under ``out_dir``."""
  from dllm_jax.train.corpus import load_corpus
  tok = train_bpe(load_corpus("train"), vocab_size)
  return save_tokenizer(tok, out_dir, model_max_length=model_max_length)


if __name__ == "__main__":
  import sys
  print(train_demo_tokenizer(sys.argv[1]))
