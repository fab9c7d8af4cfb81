"""The data layer: where text comes from and what becomes of it before training.

`sources` reads every kind of input as a stream of documents, `preprocess` cleans, deduplicates
and decontaminates them, `pii` scrubs personal data, `shards` writes and reads the versioned token
shards; none of them imports torch, nor does `config` (the data and tokenizer stages' configs).
`pipeline` chains them into token shards in one process, `ray_engine` runs the same functions as
Ray tasks, `pairs` prepares input/target pairs, `report` writes report.md and lengths.png.
`synthetic` is the one module here that runs a model (the teacher that writes the embedded
corpus), and only the stages and the engines (`pipeline`, `ray_engine`) hand it to `sources`.
"""
