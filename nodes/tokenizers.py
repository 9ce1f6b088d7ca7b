"""Finding the umT5 SentencePiece tokenizer: Wan's .pth encoders ship without it.

Looked for, in order: inside the checkpoint (ComfyUI's umt5 files carry a `spiece_model`
tensor), next to it (Wan's release puts `google/umt5-xxl/spiece.model` beside the .pth), then in
any ComfyUI-layout umT5 .safetensors in models/text_encoders (the umT5 tokenizer is the same for
all of them).
"""
from __future__ import annotations

import os

import folder_paths
from safetensors import safe_open

from ..quant.encoders import umt5
from ..quant.errors import CheckpointError
from ..quant.formats.safetensors_file import read_header

_NEIGHBOURS = ("spiece.model", os.path.join("google", "umt5-xxl", "spiece.model"),
               os.path.join("umt5-xxl", "spiece.model"), os.path.join("tokenizer", "spiece.model"))


def _piece_count(proto) -> int:
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor()
    if isinstance(proto, str):
        sp.Load(proto)
    else:
        sp.LoadFromSerializedProto(proto.numpy().tobytes())
    return sp.GetPieceSize()


def _candidates(path: str, embedded):
    if embedded is not None:
        yield embedded, "inside the checkpoint"
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for rel in (stem + ".spiece.model",) + _NEIGHBOURS:
        p = os.path.join(folder, rel)
        if os.path.isfile(p):
            yield p, p
    for name in folder_paths.get_filename_list("text_encoders"):
        other = folder_paths.get_full_path("text_encoders", name)
        if not other or not other.endswith((".safetensors", ".sft")) or os.path.samefile(other, path):
            continue
        try:
            infos, _ = read_header(other)
        except CheckpointError:
            continue
        if "spiece_model" in infos and umt5.layout(infos) is not None:
            with safe_open(other, framework="pt") as f:
                yield f.get_tensor("spiece_model"), f"borrowed from {name}"


def find_umt5_tokenizer(path: str, embedded, vocab_size: int):
    """(tokenizer model as a path or a byte tensor, where it came from)."""
    for proto, source in _candidates(path, embedded):
        pieces = _piece_count(proto)
        if pieces > vocab_size:
            raise CheckpointError(path, f"the tokenizer {source} has {pieces} pieces but the encoder's "
                                  f"embedding only {vocab_size} rows: they do not belong together.",
                                  "use the umT5 tokenizer (google/umt5-xxl spiece.model) with a umT5 encoder.")
        return proto, source
    raise CheckpointError(path, "no umT5 tokenizer was found: the file has none inside, there is no "
                          "spiece.model next to it, and no ComfyUI umT5 file in models/text_encoders carries one.",
                          "copy spiece.model from Wan's google/umt5-xxl folder next to the file, or put "
                          "ComfyUI's umt5_xxl_*.safetensors in models/text_encoders.")
