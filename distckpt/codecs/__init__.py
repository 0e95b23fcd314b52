"""Codecs: bytes in, bytes out (wire formats, file formats, MindFormers checkpoint metadata)."""
