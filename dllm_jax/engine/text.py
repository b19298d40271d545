"""Text of a growing committed prefix: incremental detokenising, stop strings, hold-back.

A diffusion request commits its generation left to right in a growing prefix of token ids.
:class:`TextAssembler` turns the successive prefixes into text deltas that concatenate to the
final text of the same request, decoding only the new tokens each time (plus the few before
them since the last clean boundary), never the whole prefix. The engine's output processing
(engine/outputs.py) runs one per request, so ``LLM.generate`` and the server give the same text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TextAssembler:
  """Turns committed-prefix token ids into text deltas that concatenate to the final text.

  The text is the decode (special tokens skipped) of the ids before the first EOS / EoT, cut to
  ``limit`` tokens and before the first stop string. While the request is not final, tokens that
  end in an incomplete UTF-8 sequence (a trailing U+FFFD that later tokens may complete) and the
  last ``max(len(stop)) - 1`` characters (the possible start of a stop string) are held back.

  ``tokenizer`` None: ids only (``text`` stays empty; ``n_tokens``, ``eos`` and the finish reason
  still follow the rules above).

  Decoding is incremental: ``text`` grows by ``decode(ids[a:]) - decode(ids[a:b])`` where ``b``
  is where the text last grew and ``a`` where it grew the time before (the window gives the
  first new token its left context, e.g. a word-start space), as vLLM does.
  """

  def __init__(self, tokenizer, eos_ids, *, limit: int | None = None,
               stops: list[str] | None = None):
    self.tok = tokenizer
    if isinstance(stops, str):
      stops = [stops]
    self.eos_ids = set(eos_ids)
    self.limit = limit
    self.stops = list(stops or [])
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.ids: list[int] = []   # accepted ids: before EOS / EoT, within limit
    self.eos = False
    self.text = ""             # the decode of ids[:self._read]
    self._prefix = 0           # window start of the next decode
    self._read = 0             # ids decoded into text
    self._marks = [(0, 0, 0)]  # (read, prefix, len(text)) after each growth, for _tokens_for
    self._searched = 0         # text already searched for stop strings
    self.sent = ""
    self.final = False
    self.stopped = False       # a stop string ended the text
    self.finish_reason: str | None = None
    self.n_tokens = 0

  def update(self, ids: list[int], finished: bool = False) -> str:
    """New text since the last call (``""`` when nothing new is stable yet). ``ids``: the
    committed prefix (it only grows; a shorter one, e.g. of a retried request, adds nothing)."""
    if self.final:
      return ""
    self._accept(ids)
    done = finished or self.eos
    self._decode(done)
    text, reason, n_tokens = self.text, None, len(self.ids)
    if self.stops:
      j = self._find_stop()
      if j is not None and (done or not self._may_stop_before(j)):
        text, done, reason = text[:j], True, "stop"
        self.stopped = True
        n_tokens = self._tokens_for(j)
    if not done and self.hold:
      text = text[:max(len(self.sent), len(text) - self.hold)]
    if not text.startswith(self.sent):
      text = self.sent  # cannot happen for prefix-stable decoding; never retract sent text
    delta, self.sent = text[len(self.sent):], text
    self.n_tokens = n_tokens
    if done:
      self.final = True
      # EOS / EoT inside the returned window, or a stop string -> "stop"; otherwise the window
      # (gen_length or max_tokens) ran out -> "length".
      self.finish_reason = reason or ("stop" if self.eos else "length")
    return delta

  # Ids and text ---------------------------------------------------------------------------------
  def _text(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def _accept(self, ids) -> None:
    n = len(self.ids)
    end = len(ids) if self.limit is None else min(len(ids), self.limit)
    if self.eos or end <= n:
      return
    new = [int(t) for t in ids[n:end]]
    for j, t in enumerate(new):
      if t in self.eos_ids:
        new, self.eos = new[:j], True
        break
    self.ids.extend(new)

  def _decode(self, done: bool) -> None:
    """Grow ``text`` by the new ids (all of them when ``done``, else up to a clean end)."""
    if self._read == len(self.ids):
      return
    if self.tok is None:
      self._read = len(self.ids)
      return
    full = self._text(self.ids[self._prefix:])
    if not done and full.endswith(REPLACEMENT):
      return  # the last token may be completed by the next ones
    prev = self._text(self.ids[self._prefix:self._read]) if self._read > self._prefix \
        else ""
    if full.startswith(prev):
      self.text += full[len(prev):]
    else:  # a tokenizer whose decode is not prefix-stable here: decode the whole once
      self.text = self._text(self.ids)
    self._prefix, self._read = self._read, len(self.ids)
    self._marks.append((self._read, self._prefix, len(self.text)))

  # Stop strings ---------------------------------------------------------------------------------
  def _find_stop(self) -> int | None:
    """Where the earliest stop string starts in ``text`` (only new text is searched)."""
    start = max(0, self._searched - self.hold - 1)
    self._searched = len(self.text)
    hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
    if not hits:
      return None
    self._searched = min(self._searched, min(hits))  # a deferred hit is found again
    return min(hits)

  def _may_stop_before(self, j: int) -> bool:
    """Could a stop string that starts before ``j`` still complete with later tokens?"""
    text, n = self.text, len(self.text)
    return any(s.startswith(text[i:]) for s in self.stops
               for i in range(max(0, n - len(s) + 1), min(j, n)))

  def _tokens_for(self, n_chars: int) -> int:
    """The fewest accepted ids whose text reaches ``n_chars`` characters (usage up to a stop
    string), decoded from the last mark before it rather than from the start."""
    if n_chars <= 0:
      return 0
    read, prefix, length = next(m for m in reversed(self._marks) if m[2] < n_chars)
    base = len(self._text(self.ids[prefix:read])) if read > prefix else 0
    for k in range(read + 1, len(self.ids) + 1):
      if length + len(self._text(self.ids[prefix:k])) - base >= n_chars:
        return k
    return len(self.ids)
