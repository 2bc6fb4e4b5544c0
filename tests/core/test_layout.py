"""Routing and position-id semantics (DESIGN.md, "Semantics that must agree across every backend").

Besides direct checks, ``hf_cogvlm`` is compared with an independent oracle: THUDM's
own ``get_expert_mask`` and ``build_position_ids`` (cogvlm-chat-hf, modeling_cogvlm.py)
re-implemented here from their definitions, applied to the ``token_type_ids`` that
THUDM's ``build_conversation_input_ids`` produces: ``[bos] + [VISION] * (patches + 2) + text``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmexport.core.layout import (
    LANGUAGE,
    VISION,
    ExpertRouting,
    ImagePiece,
    PositionIds,
    TextPiece,
    build_layout,
)

N_PATCHES = 4
CHUNK = N_PATCHES + 2  # boi, patches, eoi


def two_image_pieces():
    return [TextPiece((1, 10, 11)), ImagePiece(CHUNK), TextPiece((12, 13)), ImagePiece(CHUNK), TextPiece((14,))]


# --------------------------------------------------------------- THUDM's functions
def thudm_get_expert_mask(token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """modeling_cogvlm.get_expert_mask: a position is vision iff it and the next one are VISION."""
    t = np.asarray(token_type_ids)
    vision = np.zeros(t.shape, dtype=bool)
    vision[:, :-1] = (t[:, :-1] == VISION) & (t[:, 1:] == VISION)
    return vision, ~vision


def thudm_build_position_ids(x: np.ndarray) -> np.ndarray:
    """modeling_cogvlm.build_position_ids (no attention mask)."""
    tmp = np.array(x, copy=True)
    # boi and eoi count as language tokens
    is_boi_eoi = np.zeros(tmp.shape, dtype=bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANGUAGE)
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION) & (tmp[:, 1:] == LANGUAGE)
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION
    tmp[is_boi_eoi] = LANGUAGE
    y = np.zeros(tmp.shape, dtype=np.int64)
    y[:, 1:] = (tmp[:, 1:] == LANGUAGE) | ((tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANGUAGE))
    return np.cumsum(y, axis=-1)


def thudm_token_types(pieces) -> np.ndarray:
    out: list[int] = []
    for p in pieces:
        out += [VISION] * p.length if isinstance(p, ImagePiece) else [LANGUAGE] * len(p.ids)
    return np.asarray([out])


# -------------------------------------------------------------------- the tests
def test_image_chunk_sequential_routes_whole_chunk_to_vision():
    pieces = two_image_pieces()
    lay = build_layout(pieces, ExpertRouting.IMAGE_CHUNK, PositionIds.SEQUENTIAL, image_pad_id=7)
    n = 3 + CHUNK + 2 + CHUNK + 1
    assert len(lay) == n
    assert lay.image_spans == ((3, CHUNK), (3 + CHUNK + 2, CHUNK))
    expected_types = np.full(n, LANGUAGE)
    for start, length in lay.image_spans:
        expected_types[start:start + length] = VISION  # boi, patches and eoi
    np.testing.assert_array_equal(lay.token_type, expected_types)
    np.testing.assert_array_equal(lay.is_image, expected_types == VISION)
    np.testing.assert_array_equal(lay.position_ids, np.arange(n))
    assert lay.next_position == n
    # text ids in place, image positions hold the pad id
    np.testing.assert_array_equal(lay.input_ids[:3], [1, 10, 11])
    np.testing.assert_array_equal(lay.input_ids[lay.is_image], np.full(2 * CHUNK, 7))
    np.testing.assert_array_equal(lay.input_ids[~lay.is_image], [1, 10, 11, 12, 13, 14])
    for arr in (lay.input_ids, lay.token_type, lay.position_ids):
        assert arr.dtype == np.int64


def test_hf_cogvlm_routing_sends_eoi_to_language():
    lay = build_layout(two_image_pieces(), ExpertRouting.HF_COGVLM, PositionIds.SEQUENTIAL)
    for start, length in lay.image_spans:
        chunk = lay.token_type[start:start + length]
        assert chunk[0] == VISION  # boi
        assert (chunk[1:-1] == VISION).all()  # patches
        assert chunk[-1] == LANGUAGE  # eoi
    # eoi is still an image position (it holds an image embedding)
    assert lay.is_image.sum() == 2 * CHUNK
    assert (lay.token_type[~lay.is_image] == LANGUAGE).all()
    np.testing.assert_array_equal(lay.position_ids, np.arange(len(lay)))


def test_hf_cogvlm_positions_share_one_id_per_image():
    lay = build_layout(two_image_pieces(), ExpertRouting.HF_COGVLM, PositionIds.HF_COGVLM)
    (s1, _), (s2, _) = lay.image_spans
    pos = lay.position_ids
    np.testing.assert_array_equal(pos[:3], [0, 1, 2])
    p = 3
    assert pos[s1] == p  # boi
    np.testing.assert_array_equal(pos[s1 + 1:s1 + 1 + N_PATCHES], [p + 1] * N_PATCHES)
    assert pos[s1 + CHUNK - 1] == p + 2  # eoi
    np.testing.assert_array_equal(pos[s1 + CHUNK:s2], [p + 3, p + 4])  # text after the image
    q = p + 5
    assert pos[s2] == q and pos[s2 + CHUNK - 1] == q + 2
    assert (pos[s2 + 1:s2 + CHUNK - 1] == q + 1).all()
    assert pos[-1] == q + 3
    assert lay.next_position == q + 4
    assert lay.next_position == int(pos.max()) + 1


def test_routing_and_positions_are_independent_settings():
    pieces = two_image_pieces()
    a = build_layout(pieces, ExpertRouting.IMAGE_CHUNK, PositionIds.HF_COGVLM)
    b = build_layout(pieces, ExpertRouting.HF_COGVLM, PositionIds.HF_COGVLM)
    c = build_layout(pieces, ExpertRouting.HF_COGVLM, PositionIds.SEQUENTIAL)
    np.testing.assert_array_equal(a.position_ids, b.position_ids)
    np.testing.assert_array_equal(b.token_type, c.token_type)
    np.testing.assert_array_equal(a.token_type, a.is_image.astype(np.int64))
    assert not np.array_equal(a.token_type, b.token_type)
    assert not np.array_equal(b.position_ids, c.position_ids)


@pytest.mark.parametrize("pieces", [
    pytest.param([TextPiece((1,)), ImagePiece(CHUNK), TextPiece((5, 6, 7))], id="thudm-one-image"),
    pytest.param([TextPiece((1,)), ImagePiece(CHUNK + 10), TextPiece((5,))], id="thudm-bigger-image"),
    pytest.param(two_image_pieces(), id="two-images"),
    pytest.param([TextPiece((1, 2)), ImagePiece(CHUNK)], id="image-last"),
])
def test_hf_cogvlm_agrees_with_thudm_oracle(pieces):
    types = thudm_token_types(pieces)
    vision_mask, language_mask = thudm_get_expert_mask(types)
    positions = thudm_build_position_ids(types)
    lay = build_layout(pieces, "hf_cogvlm", "hf_cogvlm")
    np.testing.assert_array_equal(lay.token_type == VISION, vision_mask[0])
    np.testing.assert_array_equal(lay.token_type == LANGUAGE, language_mask[0])
    np.testing.assert_array_equal(lay.position_ids, positions[0])
    # the first generated token continues THUDM's numbering (one more than the last id)
    assert lay.next_position == positions[0, -1] + 1


def test_thudm_oracle_sanity():
    """The oracle itself, on the exact sequence THUDM builds: [bos] + [V]*(n+2) + text."""
    n = 3
    types = np.asarray([[LANGUAGE] + [VISION] * (n + 2) + [LANGUAGE] * 2])
    vision, _ = thudm_get_expert_mask(types)
    np.testing.assert_array_equal(vision[0], [False] + [True] * (n + 1) + [False] * 3)
    np.testing.assert_array_equal(thudm_build_position_ids(types)[0], [0, 1, 2, 2, 2, 3, 4, 5])


def test_start_position_offsets_every_position():
    pieces = two_image_pieces()
    for positions in PositionIds:
        base = build_layout(pieces, position_ids=positions)
        shifted = build_layout(pieces, position_ids=positions, start_position=100)
        np.testing.assert_array_equal(shifted.position_ids, base.position_ids + 100)
        assert shifted.next_position == base.next_position + 100


def test_text_only_and_llava_style_chunks():
    lay = build_layout([TextPiece((1, 2, 3))])
    assert not lay.is_image.any() and (lay.token_type == LANGUAGE).all()
    assert lay.image_spans == () and lay.next_position == 3
    # a chunk without boi/eoi (llava) is fine for the default semantics, even of length 1
    lay = build_layout([TextPiece((1,)), ImagePiece(1), TextPiece((2,))])
    np.testing.assert_array_equal(lay.token_type, [LANGUAGE, VISION, LANGUAGE])
    np.testing.assert_array_equal(lay.position_ids, [0, 1, 2])


def test_invalid_layouts_raise():
    with pytest.raises(ValueError, match="at least one"):
        build_layout([ImagePiece(0)])
    with pytest.raises(ValueError, match="boi and eoi"):
        build_layout([ImagePiece(2)], expert_routing="hf_cogvlm")
    with pytest.raises(ValueError, match="boi and eoi"):
        build_layout([ImagePiece(2)], position_ids="hf_cogvlm")
    with pytest.raises(ValueError):
        build_layout([TextPiece((1,))], expert_routing="everything_vision")
    with pytest.raises(ValueError):
        build_layout([TextPiece((1,))], position_ids="rope2d")


def test_media_is_the_most_recent_image_and_cross_attend_keeps_placeholders_as_text():
    from vlmexport.core.layout import ImagePlacement

    pieces = [TextPiece((1, 5)), ImagePiece(1), TextPiece((6, 7)), ImagePiece(1), TextPiece((8,))]
    lo = build_layout(pieces, image_pad_id=99, image_placement=ImagePlacement.CROSS_ATTEND)
    assert lo.input_ids.tolist() == [1, 5, 99, 6, 7, 99, 8]
    assert lo.media.tolist() == [-1, -1, 0, 0, 0, 1, 1]  # text before the first image attends to none
    assert not lo.is_image.any() and (lo.token_type == LANGUAGE).all()
    assert lo.position_ids.tolist() == list(range(7)) and lo.next_position == 7
    spliced = build_layout([TextPiece((1,)), ImagePiece(3), TextPiece((6,))])
    assert spliced.is_image.tolist() == [False, True, True, True, False]
    assert spliced.media.tolist() == [-1, 0, 0, 0, 0]
