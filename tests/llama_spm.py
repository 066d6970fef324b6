"""A Python transcription of llama.cpp's SentencePiece tokenizer (tokenizer model "llama", SPM),
reading a GGUF file's metadata alone with the gguf package's reader, with no palmcore code: the
oracle that palmcore's GGUF vocabulary is checked against in CI, where llama.cpp is not built.
It follows src/llama-vocab.cpp (``llama_vocab::impl::tokenize``, ``tokenizer_st_partition`` and
``llm_tokenizer_spm_session``), on UTF-8 bytes as llama.cpp works:

1. Special tokens are cut out of the text first, longest text first: user-defined ones always,
   control and unknown ones only with ``parse_special`` (what llama.cpp's tools pass for prompts).
2. Each remaining piece of text gets a leading space if ``add_space_prefix`` and it starts the
   text or follows a special token; then every space becomes U+2581.
3. The piece is split into UTF-8 characters (a lead byte's length). Every pair of neighbours
   whose joined text is a token (of any type) is queued, scored by that token's score; the best
   (highest score, leftmost among equals) is merged, skipped if either side was merged since,
   and the new symbol's pairs with its neighbours are queued, until the queue is empty.
4. Each symbol is its token, or (a character outside the vocabulary) its bytes as ``<0xNN>``
   tokens. (llama.cpp's ``resegment`` also splits a symbol back along the merge that made it when
   its text is no token; merges only ever make tokens, so that never happens.)
5. BOS first with ``add_special`` and ``add_bos_token``; EOS last with ``add_eos_token``.
"""

from __future__ import annotations

import heapq

from gguf import GGUFReader, TokenType


def _char_len(lead: int) -> int:
    """unicode_len_utf8: the length of a UTF-8 sequence by its first byte (1 for a stray byte)."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[lead >> 4]


class LlamaSPM:
    """``LlamaSPM(path).encode(text, add_special=True, parse_special=False)`` -> token ids."""

    def __init__(self, path: str):
        r = GGUFReader(path)

        def value(key, default=None):
            return r.fields[key].contents() if key in r.fields else default

        assert value("tokenizer.ggml.model") == "llama"
        self.tokens = [t.encode("utf-8") for t in value("tokenizer.ggml.tokens")]
        self.scores = value("tokenizer.ggml.scores")
        self.types = value("tokenizer.ggml.token_type")
        self.ids = {text: i for i, text in enumerate(self.tokens)}
        self.bos = value("tokenizer.ggml.bos_token_id", 1)
        self.eos = value("tokenizer.ggml.eos_token_id", 2)
        self.add_bos = value("tokenizer.ggml.add_bos_token", True)
        self.add_eos = value("tokenizer.ggml.add_eos_token", False)
        self.add_space_prefix = value("tokenizer.ggml.add_space_prefix", True)
        specials = [i for i, t in enumerate(self.types)
                    if t in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)]
        self.specials = sorted(specials, key=lambda i: -len(self.tokens[i]))

    def _partition(self, text: bytes, parse_special: bool) -> list:
        fragments = [text]  # bytes: text still to tokenize; int: a special token
        for special in self.specials:
            if not parse_special and self.types[special] in (TokenType.CONTROL, TokenType.UNKNOWN):
                continue
            needle, cut = self.tokens[special], []
            for fragment in fragments:
                if isinstance(fragment, int):
                    cut.append(fragment)
                    continue
                start = 0
                while (match := fragment.find(needle, start)) >= 0:
                    cut.extend([fragment[start:match]] if match > start else [])
                    cut.append(special)
                    start = match + len(needle)
                cut.extend([fragment[start:]] if start < len(fragment) else [])
            fragments = cut
        return fragments

    def _spm(self, text: bytes) -> list[int]:
        starts, offset = [], 0
        while offset < len(text):
            starts.append(offset)
            offset += min(_char_len(text[offset]), len(text) - offset)
        sizes = [min(_char_len(text[s]), len(text) - s) for s in starts]
        prev = list(range(-1, len(starts) - 1))
        nxt = list(range(1, len(starts))) + [-1]
        queue = []

        def add_bigram(left, right):
            if left == -1 or right == -1:
                return
            joined = text[starts[left]:starts[left] + sizes[left] + sizes[right]]
            token = self.ids.get(joined)
            if token is not None:
                heapq.heappush(queue, (-self.scores[token], left, right, len(joined)))

        for i in range(1, len(starts)):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if sizes[left] == 0 or sizes[right] == 0 or sizes[left] + sizes[right] != size:
                continue
            sizes[left] += sizes[right]
            sizes[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])
        out, i = [], 0 if starts else -1
        while i != -1:
            piece = text[starts[i]:starts[i] + sizes[i]]
            if piece in self.ids:
                out.append(self.ids[piece])
            else:
                out.extend(self.ids[f"<0x{b:02X}>".encode()] for b in piece)
            i = nxt[i]
        return out

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        out = [self.bos] if add_special and self.add_bos else []
        prev_special = True
        for fragment in self._partition(text.encode("utf-8"), parse_special) if text else []:
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                fragment = b" " + fragment
            out.extend(self._spm(fragment.replace(b" ", "\u2581".encode())))
            prev_special = False
        return out + ([self.eos] if add_special and self.add_eos else [])
