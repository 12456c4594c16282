"""What a tokenizer's vocabulary is, below every stage: normalised token strings (`normalize`) and what
each id is — text, byte-fallback piece, special or empty, and the special tokens' roles (`info`).

Extraction writes it beside each store (tokens.json), alignment reads it; neither imports the other.
"""
