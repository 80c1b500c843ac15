"""Rebuild ``ptool/data/wordnet_examples.txt``: everyday English calibration sentences from WordNet 3.0.

WordNet's synset glosses carry quoted usage examples ("She rubbed down her child with a sponge").
This keeps those of at least six words, capitalises them, ends each with a full stop, drops
duplicates and the held-out sentences (``ptool/data/sentences.txt``), shuffles with seed 0 and
writes the first 8,000. The source is Debian's ``wordnet-base`` package::

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    .venv/bin/python tools/make_wordnet_examples.py /tmp/wn/usr/share/wordnet
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "ptool" / "data"
COUNT = 8000
MIN_WORDS = 6


def usage_examples(wordnet_dir: Path) -> list[str]:
    """Every quoted usage example of at least :data:`MIN_WORDS` words, as a sentence, sorted."""
    out = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wordnet_dir / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "| " not in line:  # license header lines; synsets without a gloss
                continue
            for part in line.split("| ", 1)[1].strip().split("; "):
                part = part.strip()
                if not part.startswith('"'):
                    continue  # a definition, not an example
                s = part.strip('"').strip()
                if len(s.split()) >= MIN_WORDS:
                    out.add(s[0].upper() + s[1:] + ("" if s[-1] in ".!?" else "."))
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wordnet_dir", type=Path, help="folder holding data.noun, data.verb, data.adj, data.adv")
    a = p.parse_args()
    sentences = usage_examples(a.wordnet_dir)
    random.Random(0).shuffle(sentences)
    heldout = {s.strip() for s in (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines()}
    kept = [s for s in sentences if s not in heldout][:COUNT]
    (DATA / "wordnet_examples.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
    print(f"wrote {len(kept)} of {len(sentences)} sentences to {DATA / 'wordnet_examples.txt'}")


if __name__ == "__main__":
    main()
