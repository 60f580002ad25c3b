"""Quality checks over batches of rows: content ids, the stable split, contamination n-grams and
near-duplicate MinHash. Hashes are stable across processes (never Python's salted `hash`), so
shards hashed on different workers agree."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.shapes import content_text, context_of

MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling n-gram hash


def row_id(messages: list[dict], rejected: str | None = None) -> str:
    """Content id of a canonical row (a preference pair: with its rejected answer): exact duplicates share it."""
    content = messages if rejected is None else [messages, rejected]
    return hashlib.blake2b(json.dumps(content, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def split_key(messages: list[dict]) -> str:
    """What a row's split is decided by: its context (so one prompt never sits in both splits and
    appending rows never moves an old one), or its whole text when it has no context (raw corpora)."""
    context = context_of(messages)
    return content_text(context) if any(m["role"] == "user" for m in context) else content_text(messages)


def split_of(messages: list[dict], eval_fraction: float) -> str:
    h = int(hashlib.sha256(split_key(messages).encode()).hexdigest()[:8], 16)
    return "eval" if h / 0xFFFFFFFF < eval_fraction else "train"


def plain_texts(texts: list[str]) -> pa.Array:
    """Lower case, punctuation turned to spaces, runs of whitespace to one space (vectorised in Arrow)."""
    cleaned = pc.replace_substring_regex(pc.utf8_lower(pa.array(texts, pa.large_string())), r"[^\p{L}\p{M}\p{N}_\s]+", " ")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(cleaned, r"\s+", " "))


def words_of(texts: list[str]) -> pa.ListArray:
    return pc.utf8_split_whitespace(plain_texts(texts))


def fingerprints(texts: list[str] | pa.Array) -> np.ndarray:
    """[rows] uint64: equal for texts equal up to case, punctuation and spacing (`texts` may be
    `plain_texts` already)."""
    plain = texts if isinstance(texts, pa.Array) else plain_texts(texts)
    return pd.util.hash_array(plain.to_numpy(zero_copy_only=False).astype(object))


def ngram_hashes(texts: list[str] | pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-word window inside each text: ([windows] uint64, [windows] row index)."""
    words = pc.utf8_split_whitespace(texts if isinstance(texts, pa.Array) else plain_texts(texts))
    flat = words.flatten().to_numpy(zero_copy_only=False).astype(object)
    offsets = words.offsets.to_numpy()  # [rows + 1]
    if len(flat) < n:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    word_hash = pd.util.hash_array(flat)  # [words] uint64, stable across processes
    starts = len(flat) - n + 1
    acc = np.zeros(starts, np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the hash
        for j in range(n):
            acc = acc * MIX + word_hash[j:j + starts]
    row = np.repeat(np.arange(len(texts)), np.diff(offsets))[:starts]  # row of each window's first word
    inside = np.arange(starts) + n <= offsets[row + 1]  # the window ends within its own row
    return acc[inside], row[inside]


def rows_hitting(hashes: np.ndarray, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row indices whose hashes occur in the sorted `table`."""
    if not len(table) or not len(hashes):
        return np.empty(0, np.int64)
    order = np.argsort(hashes)  # sorted probes walk the table in order: ~15x faster than random ones
    hashes, rows = hashes[order], rows[order]
    idx = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
    return np.unique(rows[table[idx] == hashes])


def in_table(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[len(values)] bool: which values occur in the sorted `table`."""
    if not len(table):
        return np.zeros(len(values), bool)
    return table[np.minimum(np.searchsorted(table, values), len(table) - 1)] == values


class NearDuplicates:
    """MinHash LSH over word 5-gram shingles (datasketch): a row is a near-duplicate when an
    earlier kept row is estimated to share at least `threshold` of its shingles (Jaccard)."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def minhash(self, text: str):
        from datasketch import MinHash

        words = words_of([text])[0].as_py()
        shingles = [" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))]
        m = MinHash(num_perm=self.num_perm)
        m.update_batch([s.encode() for s in shingles])
        return m

    def seen(self, key: str, text: str) -> str | None:
        """The id of an earlier near-duplicate, or None (and the row is remembered)."""
        m = self.minhash(text)
        hits = self.lsh.query(m)
        if hits:
            return min(hits)
        self.lsh.insert(key, m)
        return None
