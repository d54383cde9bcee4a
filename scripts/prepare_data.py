"""Tokenize text files into a jmamba token file: <out>.bin (flat uint16/uint32 ids, each
document followed by EOS) and <out>.json (dtype, vocab_size, n_tokens, eos_id, tokenizer).

    python scripts/prepare_data.py --out data/wiki corpus/*.txt                 # bytes
    python scripts/prepare_data.py --tokenizer tok/tokenizer.json --out data/wiki \
        --docs lines corpus/*.txt                                               # HF BPE

With --tokenizer (a local Hugging Face `tokenizer.json`; needs `pip install tokenizers`)
ids come from that tokenizer; without it, a byte-level fallback: ids 0-255 are the UTF-8
bytes, 256 is EOS, 257 is PAD (vocab_size 258). --docs file: each file is one document;
--docs lines: each non-empty line is one. Then train with
`python train.py --data data/wiki --model.vocab_size <vocab_size from the .json>`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

BYTE_EOS, BYTE_PAD, BYTE_VOCAB = 256, 257, 258
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def documents(paths, mode):
    for path in paths:
        text = open(path, encoding="utf-8", errors="replace").read()
        if mode == "file":
            yield text
        else:
            yield from (line for line in text.splitlines() if line.strip())


def byte_encoder():
    return (lambda text: list(text.encode("utf-8"))), BYTE_EOS, BYTE_VOCAB, "bytes"


def hf_encoder(path, eos_id):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("error: --tokenizer needs the `tokenizers` package (pip install tokenizers)")
    tok = Tokenizer.from_file(path)
    if eos_id is None:
        eos_id = next((tok.token_to_id(n) for n in EOS_NAMES
                       if tok.token_to_id(n) is not None), None)
        if eos_id is None:
            sys.exit(f"error: no EOS token among {EOS_NAMES} in {path}; pass --eos_id")
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    return encode, eos_id, tok.get_vocab_size(), path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="UTF-8 text files")
    ap.add_argument("--out", required=True, help="output stem: writes <out>.bin, <out>.json")
    ap.add_argument("--tokenizer", help="a local Hugging Face tokenizer.json")
    ap.add_argument("--eos_id", type=int, help="EOS id (default: found in the tokenizer)")
    ap.add_argument("--docs", choices=("file", "lines"), default="file")
    args = ap.parse_args(argv)
    encode, eos, vocab, name = (hf_encoder(args.tokenizer, args.eos_id) if args.tokenizer
                                else byte_encoder())
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    n_tokens = n_docs = 0
    with open(args.out + ".bin", "wb") as f:
        for doc in documents(args.inputs, args.docs):
            ids = np.asarray(encode(doc) + [eos], dtype=np.int64)
            if ids.max() >= vocab:
                sys.exit(f"error: id {ids.max()} >= vocab_size {vocab}")
            f.write(ids.astype(dtype).tobytes())
            n_tokens, n_docs = n_tokens + len(ids), n_docs + 1
    if n_tokens == 0:
        sys.exit("error: no documents found in the inputs")
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "n_tokens": n_tokens,
            "n_documents": n_docs, "eos_id": eos, "tokenizer": name}
    json.dump(meta, open(args.out + ".json", "w"), indent=1)
    print(f"wrote {args.out}.bin: {n_tokens} tokens, {n_docs} documents, vocab {vocab}")


if __name__ == "__main__":
    main()
