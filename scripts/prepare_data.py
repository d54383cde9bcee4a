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
import os
import sys

import numpy as np

EXIT_BAD_INPUT, EXIT_DISK = 2, 1  # as train.py (jmamba/guard.py)


def fail(message: str, code: int = EXIT_BAD_INPUT):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)

BYTE_EOS, BYTE_PAD, BYTE_VOCAB = 256, 257, 258
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def documents(paths, mode):
    """Non-empty documents: whole files, or non-blank lines (an empty file is none)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:  # bad input (exit 2), not a failing output disk
            raise ValueError(f"cannot read input {path} ({e.strerror or e})") from None
        if mode == "file":
            if text.strip():
                yield text
        else:
            yield from (line for line in text.splitlines() if line.strip())


def byte_encoder():
    return (lambda text: list(text.encode("utf-8"))), BYTE_EOS, BYTE_VOCAB, "bytes"


def hf_encoder(path, eos_id):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("--tokenizer needs the `tokenizers` package (pip install tokenizers)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises its own types
        fail(f"--tokenizer {path} cannot be loaded ({e}); pass a tokenizer.json")
    if eos_id is None:
        eos_id = next((tok.token_to_id(n) for n in EOS_NAMES
                       if tok.token_to_id(n) is not None), None)
        if eos_id is None:
            fail(f"no EOS token among {EOS_NAMES} in {path}; pass --eos_id")
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
    # Every check before the output is touched: a failed run leaves an existing dataset
    # as it was.
    for path in args.inputs + ([args.tokenizer] if args.tokenizer else []):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            fail(f"{path} is not a readable file; nothing was written")
    encode, eos, vocab, name = (hf_encoder(args.tokenizer, args.eos_id) if args.tokenizer
                                else byte_encoder())
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:  # the output folder is made for the user, as `train.py --ckpt_dir` does
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out}: cannot create directory {out_dir} ({e.strerror}); pass "
             "another --out", EXIT_DISK)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    n_tokens = n_docs = 0
    # Written to temporary names in the same directory, moved into place only when both
    # are complete (os.replace is atomic on one filesystem).
    tmp_bin, tmp_json = args.out + ".bin.tmp", args.out + ".json.tmp"
    replaced = False
    try:
        with open(tmp_bin, "wb") as f:
            for doc in documents(args.inputs, args.docs):
                ids = np.asarray(encode(doc) + [eos], dtype=np.int64)
                if ids.max() >= vocab or ids.min() < 0:
                    raise ValueError(f"ids must lie in [0, vocab_size {vocab}); got "
                                     f"{ids.min()}..{ids.max()} (check --eos_id)")
                f.write(ids.astype(dtype).tobytes())
                n_tokens, n_docs = n_tokens + len(ids), n_docs + 1
            f.flush()
            os.fsync(f.fileno())
        if n_docs == 0:
            raise ValueError("the inputs hold no non-empty document")
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "n_tokens": n_tokens,
                "n_documents": n_docs, "eos_id": eos, "tokenizer": name}
        with open(tmp_json, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, args.out + ".bin")
        replaced = True
        os.replace(tmp_json, args.out + ".json")
    except Exception as e:  # any failure: remove the partial files and say what is left
        for tmp in (tmp_bin, tmp_json):
            if os.path.exists(tmp):
                os.remove(tmp)
        disk = isinstance(e, OSError)
        left = (f"{args.out}.bin is new but {args.out}.json is old: re-run to make them agree"
                if replaced else "nothing was replaced")
        fail(f"{e.strerror if disk and e.strerror else e} (writing {args.out}); {left}"
             + ("; free space or pass another --out" if disk else ""),
             EXIT_DISK if disk else EXIT_BAD_INPUT)
    print(f"wrote {args.out}.bin: {n_tokens} tokens, {n_docs} documents, vocab {vocab}")


if __name__ == "__main__":
    main()
