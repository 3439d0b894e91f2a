import numpy as np
import pytest

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.input_batch import CachedRequestState, build_inputs


def _state(req_id, tokens, computed, blocks, n_prompt=None, mm=(), mrope=None, delta=0):
    return CachedRequestState(
        req_id=req_id,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens) if n_prompt is None else n_prompt,
        mm_items=list(mm),
        sampling_params=SamplingParams(),
        block_ids=list(blocks),
        num_computed_tokens=computed,
        mrope_positions=mrope,
        mrope_delta=delta,
    )


def test_flattened_batch_has_no_padding_and_maps_slots_through_block_tables():
    states = {
        "a": _state("a", range(100, 110), 0, [7, 3]),  # prefill of 10 tokens, block size 4 → 3 blocks needed
        "b": _state("b", range(200, 206), 5, [1, 9]),  # decode of its 6th token
    }
    states["a"].block_ids.append(5)
    inputs = build_inputs(["a", "b"], {"a": 10, "b": 1}, states, block_size=4, uses_mrope=False)
    assert inputs.input_ids.tolist() == list(range(100, 110)) + [205]
    assert inputs.query_start_loc.tolist() == [0, 10, 11]
    assert inputs.seq_lens.tolist() == [10, 6]
    # token 5 of "a" is in its second block (3), offset 1; token 5 of "b" → block 9, offset 1
    assert inputs.slot_mapping[5] == 3 * 4 + 1
    assert inputs.slot_mapping[10] == 9 * 4 + 1
    assert inputs.positions.tolist() == list(range(10)) + [5]
    assert inputs.sampling_req_ids == ["a", "b"]
    assert inputs.logits_indices.tolist() == [9, 10]
    assert inputs.block_tables.tolist() == [[7, 3, 5], [1, 9, 0]]


def test_partial_prefill_chunk_does_not_sample():
    states = {"a": _state("a", range(20), 4, [0, 1, 2, 3, 4])}
    inputs = build_inputs(["a"], {"a": 8}, states, block_size=4, uses_mrope=False)
    assert inputs.sampling_req_ids == []
    assert inputs.positions.tolist() == list(range(4, 12))


def test_mrope_positions_use_prompt_table_then_delta_for_generated_tokens():
    table = np.stack([np.arange(6), np.arange(6) * 2, np.arange(6) * 3])
    st = _state("a", [1, 2, 3, 4, 5, 6, 7, 8], 4, [0, 1], n_prompt=6, mrope=table, delta=-3)
    inputs = build_inputs(["a"], {"a": 4}, {"a": st}, block_size=4, uses_mrope=True)
    assert inputs.positions[:, :2].tolist() == [[4, 5], [8, 10], [12, 15]]
    assert inputs.positions[:, 2:].tolist() == [[3, 4]] * 3


def test_chunk_inside_an_image_takes_the_matching_encoder_rows():
    # image placeholder occupies prompt positions 3..10 (8 tokens); the chunk covers 6..13
    item = MultiModalItem("image", "h1", offset=3, length=8, data={})
    st = _state("a", range(16), 6, [0, 1, 2, 3], mm=[item])
    inputs = build_inputs(["a"], {"a": 8}, {"a": st}, block_size=4, uses_mrope=False)
    (s,) = inputs.mm_slices
    assert (s.content_hash, s.row_start, s.row_end) == ("h1", 3, 8)
    assert s.dest.tolist() == [0, 1, 2, 3, 4]


def test_is_embed_mask_skips_non_embedding_positions():
    mask = np.array([1, 1, 0, 1, 1, 0], dtype=bool)  # e.g. [IMG] [IMG] [IMG_BREAK] ...
    item = MultiModalItem("image", "h2", offset=2, length=6, data={}, is_embed=mask)
    st = _state("a", range(10), 0, [0, 1, 2])
    st.mm_items = [item]
    inputs = build_inputs(["a"], {"a": 5}, {"a": st}, block_size=4, uses_mrope=False)
    (s,) = inputs.mm_slices
    assert (s.row_start, s.row_end) == (0, 2)
    assert s.dest.tolist() == [2, 3]


def test_scheduling_past_known_tokens_is_an_error():
    st = _state("a", range(4), 3, [0])
    with pytest.raises(RuntimeError, match="only 4 are known"):
        build_inputs(["a"], {"a": 2}, {"a": st}, block_size=4, uses_mrope=False)
