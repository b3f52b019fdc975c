"""Tokenizer-free batching: bytes are the tokens (id = byte + offset; PAD 0, BOS 1, EOS 2)."""

from .packing import PackedBatch, decode_bytes, document_mask, pack_documents
from .stream import ByteStream

__all__ = ["ByteStream", "PackedBatch", "decode_bytes", "document_mask", "pack_documents"]
