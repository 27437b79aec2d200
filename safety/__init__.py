"""Safety: moderation classifiers for the server's input and output hooks, and the SEAT bias probe with
SENT-DEBIAS mitigation on sentence embeddings."""
