"""Batching: tokenizer-free byte ids (id = byte + offset; PAD 0, BOS 1, EOS 2) and the packer
behind pack_documents, ByteStream and PackingCollator."""

from .collator import PackingCollator
from .packing import PackedBatch, decode_bytes, document_mask, pack_documents
from .stream import ByteStream

__all__ = [
    "ByteStream",
    "PackedBatch",
    "PackingCollator",
    "decode_bytes",
    "document_mask",
    "pack_documents",
]
