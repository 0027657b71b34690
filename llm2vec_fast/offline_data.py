"""Offline text for benchmarks, evaluation and training examples, read from the `gensim` wheel's test data.

The files stay in the installed package (their licences differ from ours); nothing is copied into this repo.
- `wikipedia_sentences`: sentences of a 2016 English Wikipedia excerpt (markup removed with gensim's filter).
- `lee_background_documents`: the 300 news documents of Lee et al. (2005)'s background corpus.
"""

from __future__ import annotations

import bz2
import functools
import os
import re

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_test_data_dir() -> str:
    """The directory of the gensim package's test data; RuntimeError when gensim is not installed."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise RuntimeError("this needs the gensim package (its test data holds the offline corpora): "
                           "pip install gensim") from None
    return os.path.dirname(datapath("lee.cor"))


@functools.lru_cache(maxsize=None)
def wikipedia_sentences(min_words: int = 5, max_words: int = 60) -> tuple[str, ...]:
    """Plain-text sentences of the Wikipedia excerpt, in file order (deterministic)."""
    from gensim.corpora.wikicorpus import filter_wiki

    with bz2.open(os.path.join(gensim_test_data_dir(), _WIKI_FILE), "rt", encoding="utf-8") as f:
        xml = f.read()
    sentences = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = filter_wiki(_unescape(page))
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(("=", "*", "|", "!", "{", "#")):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line):
                words = sentence.split()
                if min_words <= len(words) <= max_words and sentence[-1:] in ".!?":
                    sentences.append(" ".join(words))
    return tuple(sentences)


@functools.lru_cache(maxsize=None)
def lee_background_documents() -> tuple[str, ...]:
    """The documents of Lee et al. (2005)'s background corpus: the non-empty lines of lee_background.cor."""
    with open(os.path.join(gensim_test_data_dir(), "lee_background.cor"), encoding="latin-1") as f:
        return tuple(line.strip() for line in f if line.strip())


def _unescape(text: str) -> str:
    # XML entities of the dump, then the bold/italic quote markup that filter_wiki leaves in place.
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#039;", "'"), ("&amp;", "&"),
                         ("\'\'\'", ""), ("\'\'", "")):
        text = text.replace(entity, char)
    return text
