"""lmloop: the whole life of a language model as one loop.

collect data -> preprocess -> train -> evaluate -> deploy -> interact -> collect again.
Run `lmloop --help` for the stages.
"""

__version__ = "0.1.0"
