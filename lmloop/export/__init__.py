"""Models leaving lmloop: a Hugging Face folder (`hf`) or a llama.cpp GGUF file (`gguf`).

`config` holds the command's settings (torch-free); `hf` and `gguf` write the formats.
"""
