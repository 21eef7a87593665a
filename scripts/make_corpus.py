#!/usr/bin/env python3
"""Regenerate BISTRO's embedded corpus from the public-domain Jargon File.

Source: Debian package `jargon-text` 4.4.7-4.1 (the Jargon File 4.4.7 by Eric S. Raymond,
public domain; see bistro-train/data/corpus/SOURCE.md).

    apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb /tmp/jt
    python3 scripts/make_corpus.py /tmp/jt/usr/share/doc/jargon-text/jargon.txt.gz

Output: bistro-train/data/corpus/jargon-000N.jsonl.gz, 4 shards of one JSON object per
line, {"text": ...}. A document is one lexicon entry (from its `:term:` line to the next)
or, in the front matter, one section between blank-line-separated headings. Lines inside
a paragraph are joined with spaces; paragraphs are separated by a newline. gzip is written
with mtime 0 so the output is byte-reproducible.
"""
import gzip, io, json, re, sys
from pathlib import Path

src = Path(sys.argv[1])
out_dir = Path(__file__).resolve().parent.parent / "bistro-train" / "data" / "corpus"
text = gzip.decompress(src.read_bytes()).decode("utf-8")
paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
paras = [p for p in paras if p and not set(p) <= set("═─│┌┐└┘├┤┬┴┼ ")]
entry = re.compile(r"^:[^ :][^:]*:")
docs, cur = [], []
for p in paras:
    starts_entry = bool(entry.match(p))
    # Front matter: a new document every ~8 paragraphs; lexicon: one per entry.
    if cur and (starts_entry or (not any(entry.match(c) for c in cur) and len(cur) >= 8)):
        docs.append("\n".join(cur))
        cur = []
    cur.append(p)
if cur:
    docs.append("\n".join(cur))
docs = [d for d in docs if len(d) >= 20]
n_shards = 4
per = (len(docs) + n_shards - 1) // n_shards
for s in range(n_shards):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        for d in docs[s * per:(s + 1) * per]:
            g.write((json.dumps({"text": d}, ensure_ascii=False) + "\n").encode("utf-8"))
    (out_dir / f"jargon-{s:04d}.jsonl.gz").write_bytes(buf.getvalue())
print(f"{len(docs)} documents, {sum(map(len, docs))} characters, {n_shards} shards -> {out_dir}")
