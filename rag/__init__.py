"""Retrieval-augmented generation: token chunking, sentence embeddings on lmlab's BERT, exact and faiss
indexes, and generation with numbered citations."""
