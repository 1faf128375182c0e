"""Pure functions of the release contract: no model needed."""

import pytest

from phi3v_ort.package import contract


@pytest.mark.parametrize("size, hd, tokens", [
    ((640, 400), (1008, 1344), 1921),  # the contract's examples
    ((300, 700), (1680, 1008), 2377),
    ((336, 336), (1344, 1344), 2509),  # square: 4x4 crops
    ((1, 1), (1344, 1344), 2509),
])
def test_examples(size, hd, tokens):
    assert contract.hd_size(*size) == hd
    assert contract.image_token_count(*hd) == tokens
    assert contract.image_tokens_for(*size) == tokens


@pytest.mark.parametrize("width, height", [(1, 1), (5000, 10), (10, 5000), (4032, 3024), (333, 1000), (1000, 333)])
def test_hd_size_stays_within_16_crops_and_336_grid(width, height):
    h, w = contract.hd_size(width, height)
    assert h % 336 == 0 and w % 336 == 0
    assert (h // 336) * (w // 336) <= contract.MAX_CROPS
    # orientation is kept: a tall image stays tall
    if height > width:
        assert h >= w
    if width > height:
        assert w >= h


def test_rejects_empty_size():
    with pytest.raises(ValueError):
        contract.hd_size(0, 10)


def test_special_token_ids_match_the_release():
    ids = {content: contract.BASE_VOCAB_SIZE + off for off, content, _ in contract.ADDED_TOKENS}
    assert ids["<|endoftext|>"] == 32000
    assert ids["<|assistant|>"] == 32001
    assert ids["<|system|>"] == 32006
    assert ids["<|end|>"] == 32007 == contract.EOS_TOKEN_ID
    assert ids["<|user|>"] == 32010
    assert ids["<|image|>"] == 32044
    assert len(ids) == 45 and max(ids.values()) < contract.VOCAB_SIZE == 32064
