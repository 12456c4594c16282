"""Reading corpora: a text file (one text per non-empty line), a folder or glob of text files (one text per
file), JSONL (a text field, or `messages` chat records), Parquet (one file, a folder, a glob, a hub
dataset's cache) or a `datasets` folder (`save_to_disk`), streamed in batches.

Chat records become the model's chat template; only assistant tokens are scored (FuseChat).
"""

from fusekit.corpus.reader import CorpusIndex, RangeReader, open_source, read_range, read_records, scan
from fusekit.corpus.records import CorpusError, CorpusStats, Record, corpus_fingerprint, record_key
from fusekit.corpus.sources import TEXT_SUFFIXES, Source, resolve_source
from fusekit.corpus.tokenize import TokenizedText, has_chat_template, tokenize_record, tokenize_with_offsets, windows_of

__all__ = [
    "TEXT_SUFFIXES", "CorpusError", "CorpusIndex", "RangeReader", "CorpusStats", "Record", "Source", "TokenizedText", "corpus_fingerprint",
    "has_chat_template", "open_source", "read_range", "read_records", "record_key", "resolve_source", "scan", "tokenize_record",
    "tokenize_with_offsets", "windows_of",
]
