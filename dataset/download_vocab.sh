#!/usr/bin/env bash
# Download the GPT-2 BPE vocabulary (gpt2-vocab.json, gpt2-merges.txt) used by
# --tokenizer-type GPT2BPETokenizer.
# Usage: dataset/download_vocab.sh [OUTPUT_DIR]   (default: this script's directory)
# GPT2_VOCAB_BASE_URL overrides the source (e.g. a mirror).
# Each file is written to a temporary name and renamed only after a complete download.
set -euo pipefail

BASE_URL="${GPT2_VOCAB_BASE_URL:-https://s3.amazonaws.com/models.huggingface.co/bert}"
OUT_DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
mkdir -p "$OUT_DIR"

fetch() {  # fetch URL DEST
    local url="$1" dest="$2" tmp
    tmp="$(mktemp "${dest}.part.XXXXXX")"
    if command -v curl >/dev/null 2>&1; then
        curl --fail --location --silent --show-error --retry 3 -o "$tmp" "$url" \
            || { rm -f "$tmp"; echo "error: download of $url failed" >&2; return 1; }
    elif command -v wget >/dev/null 2>&1; then
        wget --quiet --tries=3 -O "$tmp" "$url" \
            || { rm -f "$tmp"; echo "error: download of $url failed" >&2; return 1; }
    else
        rm -f "$tmp"
        echo "error: neither curl nor wget is installed" >&2
        return 1
    fi
    if [[ ! -s "$tmp" ]]; then
        rm -f "$tmp"
        echo "error: empty download from $url" >&2
        return 1
    fi
    mv -f "$tmp" "$dest"
    echo "wrote $dest"
}

for name in gpt2-vocab.json gpt2-merges.txt; do
    fetch "$BASE_URL/$name" "$OUT_DIR/$name"
done
