"""The feedback layer: `store`, the SQLite database of conversations, ratings and corrections
(append-only migrations; never imports torch). The HTTP route that writes to it is
`lmloop.server.feedback`; turning it into training data is the `lmloop feedback export` stage.
"""
