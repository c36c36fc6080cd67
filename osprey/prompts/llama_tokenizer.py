"""The LLaMA/Vicuna tokenizer exactly as the released Osprey-7B was trained with.

The release loaded Vicuna's SentencePiece ``tokenizer.model`` through transformers 4.31's fast
tokenizer and added ``<mask>`` (32000) and ``<pos>`` (32001) as special tokens. That tokenizer
encodes every text between two special tokens on its own with SentencePiece's dummy ``▁`` in
front, so ``" in"`` after ``<pos>`` is ``▁`` + ``▁in`` and ``"?"`` is ``▁?``. Newer transformers
convert the same file differently (merges ranked by id instead of by piece score, a Metaspace
pre-tokenizer whose ``legacy`` flag only prepends once), which turns ``" in"`` into ``▁▁`` + ``in``:
a sequence the released weights never saw. So the pipeline is rebuilt here from the
SentencePiece model itself, whatever the checkpoint's ``tokenizer_config.json`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from osprey.constants import MASK_TOKEN, POS_TOKEN

SENTENCEPIECE_FILE = "tokenizer.model"
SPACE = "\u2581"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# The ids the released tokenizer gives the region tokens (its added_tokens.json).
RELEASE_REGION_IDS = {MASK_TOKEN: 32000, POS_TOKEN: 32001}


def build_release_tokenizer(source: str | Path) -> PreTrainedTokenizerFast:
    """The released Osprey tokenizer from a SentencePiece ``tokenizer.model`` or a directory.

    ``source`` is the ``tokenizer.model`` file or a directory holding it (Vicuna's, or a released
    Osprey checkpoint's). A directory's ``added_tokens.json``, when present, must give ``<mask>``
    and ``<pos>`` the ids they get here (right after the SentencePiece vocabulary).
    """
    path = Path(source)
    directory = path if path.is_dir() else path.parent
    model_file = path / SENTENCEPIECE_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise ValueError(f"no SentencePiece model at {str(model_file)!r}")
    backend = _backend_from_sentencepiece(model_file)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # LLaMA has no pad token; the release pads with <unk>, on the right.
        pad_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens([MASK_TOKEN, POS_TOKEN], special_tokens=True)
    _check_added_tokens(tokenizer, directory / "added_tokens.json")
    return tokenizer


def _backend_from_sentencepiece(model_file: Path) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if pieces[:3] != [UNK, BOS, EOS]:
        raise ValueError(
            f"{str(model_file)!r} is not a LLaMA SentencePiece model: its first pieces are "
            f"{pieces[:3]}, expected {[UNK, BOS, EOS]}"
        )
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = [sp.get_score(i) for i in range(len(pieces))]
    bpe = models.BPE(
        vocab,
        _merges_by_score(pieces, scores, vocab),
        unk_token=UNK,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    # One dummy "▁" before every separately normalised text: each text between special tokens.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tok


def _merges_by_score(
    pieces: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a piece into two known pieces, the best-scored pieces' merges first.

    SentencePiece BPE merges by piece score; ranking merges by id instead changes how runs of
    spaces split (the difference between ``▁`` ``▁in`` and ``▁▁`` ``in``).
    """
    merges: list[tuple[float, int, int, int, str, str]] = []
    for index, (piece, score) in enumerate(zip(pieces, scores, strict=True)):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, index, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:4])
    return [(left, right) for *_, left, right in merges]


def _check_added_tokens(tokenizer: PreTrainedTokenizerFast, added_tokens_file: Path) -> None:
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in RELEASE_REGION_IDS}
    if added_tokens_file.is_file():
        declared = json.loads(added_tokens_file.read_text())
        for token, token_id in got.items():
            if token in declared and declared[token] != token_id:
                raise ValueError(
                    f"{str(added_tokens_file)!r} gives {token} the id {declared[token]}, but it "
                    f"follows the SentencePiece vocabulary at {token_id}"
                )
