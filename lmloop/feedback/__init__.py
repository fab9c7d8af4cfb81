"""The feedback layer: `store`, the SQLite database of conversations, ratings and corrections
(append-only migrations; never imports torch). The HTTP route that writes to it is
`lmloop.server.feedback`; `export` turns it into training data (sft, dpo, kto, text records, and
the loop's split of every format at once); `config` holds the settings of `lmloop feedback
export|stats`.
"""
