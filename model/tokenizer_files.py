"""The tokenizer files written into generated checkpoints (``model.checkpoint.make_model``).

A small byte-level BPE, built deterministically without training libraries: the 256 byte
symbols, then merges learned greedily from a fixed corpus (most frequent pair first, ties broken
by the pair itself), then Kimi-style special tokens at the top of the vocabulary. The chat
template follows Kimi-K2's layout: ``<|im_user|>user<|im_middle|>...<|im_end|>``; declared
tools go first, as JSON in a ``tool_declare`` system turn; an assistant turn's calls follow its
content in a tool-call section (``<|tool_calls_section_begin|>``, then per call
``<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>``), where ID is the
call's own id or K2's ``functions.NAME:IDX``; a tool result is a ``tool`` system turn that starts
with ``## Return of ID``.

The same vocabulary can also be written as a Kimi ``tiktoken.model`` (base64 token, rank), so the
tiktoken loading path is tested on generated data.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VOCAB_SIZE = 512
NUM_SPECIAL_SLOTS = 16  # the top ids of the vocabulary hold special tokens
BOS, EOS, IM_END = "[BOS]", "[EOS]", "<|im_end|>"
SPECIAL_TOKENS = (
    BOS,
    EOS,
    IM_END,
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "[UNK]",
    "[PAD]",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)

CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif role == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- elif role == 'tool' -%}<|im_system|>tool<|im_middle|>"
    "{%- if message.get('tool_call_id') -%}"
    "## Return of {{ message['tool_call_id'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- else -%}{{ raise_exception('unknown role ' ~ role) }}"
    "{%- endif -%}"
    "{{- message['content'] if message['content'] is not none else '' -}}"
    "{%- if role == 'assistant' and message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set call_id = call.get('id') or "
    "('functions.' ~ call['function']['name'] ~ ':' ~ loop.index0) -%}"
    "<|tool_call_begin|>{{ call_id }}<|tool_call_argument_begin|>"
    "{%- if call['function']['arguments'] is string -%}{{ call['function']['arguments'] }}"
    "{%- else -%}{{ call['function']['arguments'] | tojson }}{%- endif -%}"
    "<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

# Text the merges are learned from: enough distinct words for a few hundred merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A request arrives at the ingress, is validated,
tokenised and routed by the scheduler to a prefill instance and a decode instance. The prefill
instance computes the attention of the whole prompt in chunks and streams the latent cache of
every layer to the decode instance, which then generates the answer one token at a time.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is
the capital of France, and Berlin is the capital of Germany. Tokens, tokens, tokens everywhere.
def forward(self, hidden_states, positions):
    return self.norm(hidden_states + self.attention(hidden_states, positions))
for i in range(10): print(i * 2 + 1)
The mixture of experts layer routes each token to a few experts chosen by a router with
sigmoid scores and a correction bias; the shared expert sees every token. Numbers: 0 1 2 3 4 5 6
7 8 9 10 100 1000 2024 3.14159 42. user assistant system tool function arguments name content
message role the of and to in is that for it with as was on be at by this had not are but from
or have an they which one you were her all she there would their we him been has when who will
more no if out so said what up its about into than them can only other new some could time
these two may then do first any my now such like our over man me even most made after also did
many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year
off come since against go came right used take three states himself few house use during
without again place around however home small found thought went say part once general high
upon school every does got united left number course war until always away something fact
though water less public put think almost hand enough far took head yet government system
better set told nothing night end why called did eyes find going look asked later knew point
"""


@cache
def byte_symbols() -> tuple[str, ...]:
    """The printable stand-in for each byte used by byte-level BPE (index = byte value).

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are shifted to
    code points from 256 up, so every byte is one visible character in vocab and merges.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return tuple(symbols[b] for b in range(256))


@cache
def learn_merges(num_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on ``_CORPUS``: most frequent adjacent pair first, ties broken by the pair."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(_CORPUS))
    splits = {w: tuple(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, parts in splits.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = tuple(out)
    return tuple(merges)


def special_tokens(vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
    """Special token -> id: the named ones, then reserved fillers, in the top 16 ids."""
    names = list(SPECIAL_TOKENS)
    names += [f"<|reserved_token_{i}|>" for i in range(NUM_SPECIAL_SLOTS - len(names))]
    first = vocab_size - NUM_SPECIAL_SLOTS
    return {name: first + i for i, name in enumerate(names)}


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """The byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids."""
    num_regular = vocab_size - NUM_SPECIAL_SLOTS
    merges = list(learn_merges(num_regular - 256))
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # If the corpus ran out of pairs, pad with unreachable reserved tokens to keep ids stable.
    while len(vocab) < num_regular:
        vocab[f"<|unused_{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens(vocab_size)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def tokenizer_config(vocab_size: int = VOCAB_SIZE) -> dict:
    """``tokenizer_config.json``: special tokens (Kimi's ``added_tokens_decoder``), chat template."""
    specials = special_tokens(vocab_size)
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for name, i in specials.items()
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``; returns the special token ids."""
    out_dir = Path(out_dir)
    build_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"), pretty=False)
    cfg = tokenizer_config(vocab_size)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return special_tokens(vocab_size)


def write_tiktoken_files(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Write the same vocabulary the way Kimi ships it: ``tiktoken.model`` + tokenizer_config."""
    out_dir = Path(out_dir)
    to_byte = {s: b for b, s in enumerate(byte_symbols())}
    tok = build_tokenizer(vocab_size)
    lines = []
    for piece, rank in sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda x: x[1]):
        if piece.startswith("<|unused_"):
            continue
        raw = bytes(to_byte[c] for c in piece)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}")
    (out_dir / "tiktoken.model").write_text("\n".join(lines) + "\n")
    cfg = tokenizer_config(vocab_size)
    cfg["tokenizer_class"] = "TikTokenTokenizer"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
