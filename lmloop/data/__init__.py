"""The data layer: where text comes from and what becomes of it before training.

`sources` reads every kind of input as a stream of documents, `preprocess` cleans, deduplicates
and decontaminates them, `pii` scrubs personal data, `shards` writes and reads the versioned token
shards; none of them imports torch. `synthetic` is the one module here that runs a model (the
teacher that writes the embedded corpus), and only the stages hand it to `sources`.
"""
