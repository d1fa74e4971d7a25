"""BM25 (bm25s): the SPAR teacher, LEDR scores, ART's bm25 teacher and a baseline."""
