"""Prose-like text: the Python documentation shipped with the interpreter (``pydoc_data``), or,
where a distribution strips it, sentences generated from a small embedded word list."""

from __future__ import annotations

import functools

from .rng import Rng

_WORDS = """
the a an this that every each some many few most other new old small large long short early late
river mountain garden city village market harbour letter window morning evening winter summer
teacher farmer sailor doctor writer traveller child friend neighbour stranger king queen soldier
bird horse dog cat fish tree flower stone bridge road house door table book song story idea
question answer reason moment year day night light shadow voice water fire wind rain snow sea
walked found saw heard told kept brought carried opened closed followed remembered wrote read
built crossed watched called asked gave took left reached turned began finished wanted needed
quickly slowly quietly carefully suddenly often never always almost perhaps together again
and but or so because while when after before until although since though if then yet
in on under over near beside behind through across along into from with without about around
bright dark quiet loud warm cold gentle strange simple careful happy tired proud honest young
""".split()
_NOUN_START, _NOUN_STOP = 16, 80  # slice of _WORDS that are nouns (for sentence openings)
_JOIN = ["and", "but", "so", "because", "while", "when", "although", "then"]


def generated_prose(n_bytes: int, *seed: int | str) -> bytes:
    """At least ``n_bytes`` of deterministic prose-like text (sentences and paragraphs; no digits)."""
    rng = Rng("prose", *seed)
    out: list[str] = []
    size = 0
    while size < n_bytes:
        para = []
        for _ in range(rng.randint(3, 7)):
            words = ["The", rng.choice(_WORDS[_NOUN_START:_NOUN_STOP])]
            for _ in range(rng.randint(4, 14)):
                words.append(rng.choice(_WORDS))
            if rng.coin():
                words += [",", rng.choice(_JOIN), "the", rng.choice(_WORDS[_NOUN_START:_NOUN_STOP])]
                words += [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
            para.append(" ".join(words).replace(" ,", ",") + ".")
        text = " ".join(para) + "\n\n"
        out.append(text)
        size += len(text)
    return "".join(out).encode()


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> list[tuple[str, bytes]]:
    """The interpreter's own help topics (``pydoc_data.topics``), sorted by topic; [] if absent."""
    try:
        from pydoc_data.topics import topics
    except Exception:  # stripped distributions
        return []
    return [(k, str(v).encode("utf-8")) for k, v in sorted(topics.items()) if v]
