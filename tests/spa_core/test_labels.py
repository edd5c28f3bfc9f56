"""spa_core/labels.py: selection labels on hand-computed boxes at two stage resolutions."""

from __future__ import annotations

import pytest
import torch

from spa_core.labels import boxes_to_mask, selection_labels_from_boxes, selection_labels_from_masks

GRIDS = [(8, 8), (4, 4)]  # strides 4 and 8 on a 32 x 32 image


def _positives(label):
    return sorted(map(tuple, label.nonzero().tolist()))


def test_box_covering_exactly_two_patches():
    boxes = [torch.tensor([[4.0, 8.0, 12.0, 12.0]])]  # x 4..12, y 8..12: patches (2,1), (2,2) at stride 4
    labels = selection_labels_from_boxes(boxes, (32, 32), GRIDS)
    assert set(labels) == set(GRIDS)
    assert labels[(8, 8)].shape == (1, 8, 8) and labels[(8, 8)].dtype == torch.float32
    assert _positives(labels[(8, 8)][0]) == [(2, 1), (2, 2)]
    assert _positives(labels[(4, 4)][0]) == [(1, 0), (1, 1)]  # stride 8: x 4..12 spans cells 0 and 1


def test_box_straddling_a_patch_edge():
    boxes = [torch.tensor([[6.5, 2.0, 9.5, 3.0]])]  # pixels x 6..9 cross the edge at x = 8
    labels = selection_labels_from_boxes(boxes, (32, 32), GRIDS)
    assert _positives(labels[(8, 8)][0]) == [(0, 1), (0, 2)]
    assert _positives(labels[(4, 4)][0]) == [(0, 0), (0, 1)]


def test_box_ending_on_a_patch_edge_does_not_spill():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    labels = selection_labels_from_boxes(boxes, (32, 32), GRIDS)
    assert _positives(labels[(8, 8)][0]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert _positives(labels[(4, 4)][0]) == [(0, 0)]


def test_empty_image_and_batch_of_mixed_images():
    boxes = [torch.zeros(0, 4), torch.tensor([[4.0, 8.0, 12.0, 12.0], [30.0, 30.0, 31.0, 31.0]])]
    labels = selection_labels_from_boxes(boxes, (32, 32), GRIDS)
    for g in GRIDS:
        assert labels[g].shape == (2, *g)
        assert labels[g][0].sum() == 0
    assert _positives(labels[(8, 8)][1]) == [(2, 1), (2, 2), (7, 7)]
    assert _positives(labels[(4, 4)][1]) == [(1, 0), (1, 1), (3, 3)]


def test_coverage_threshold():
    boxes = [torch.tensor([[4.0, 8.0, 12.0, 12.0]])]  # at stride 8 covers 16/64 = 0.25 of cells (1,0), (1,1)
    at = selection_labels_from_boxes(boxes, (32, 32), GRIDS, coverage=0.25)
    above = selection_labels_from_boxes(boxes, (32, 32), GRIDS, coverage=0.3)
    assert _positives(at[(4, 4)][0]) == [(1, 0), (1, 1)]
    assert above[(4, 4)].sum() == 0
    assert _positives(above[(8, 8)][0]) == [(2, 1), (2, 2)]  # stride 4 cells are fully covered


def test_image_not_divisible_by_the_stride():
    # 30 x 30 image: the backbone pads to 32, so the last cells hold only 2 (stride 4) or 6 (stride 8) rows
    boxes = [torch.tensor([[28.0, 28.0, 30.0, 30.0]])]
    grids = [(8, 8), (4, 4)]
    any_px = selection_labels_from_boxes(boxes, (30, 30), grids)
    assert _positives(any_px[(8, 8)][0]) == [(7, 7)] and _positives(any_px[(4, 4)][0]) == [(3, 3)]
    full = selection_labels_from_boxes(boxes, (30, 30), grids, coverage=1.0)  # in-image part fully covered
    assert _positives(full[(8, 8)][0]) == [(7, 7)]
    assert full[(4, 4)].sum() == 0  # 4 of 36 in-image pixels


def test_masks_and_boxes_agree():
    boxes = [torch.tensor([[3.2, 5.0, 17.9, 9.1]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    m = boxes_to_mask(boxes, (32, 32))
    assert m[0].sum() == (18 - 3) * (10 - 5) and m[1].sum() == 1
    for cov in (None, 0.5):
        a = selection_labels_from_boxes(boxes, (32, 32), GRIDS, coverage=cov)
        b = selection_labels_from_masks(m.bool(), GRIDS, coverage=cov)
        for g in GRIDS:
            assert torch.equal(a[g], b[g])


def test_bad_coverage_is_loud():
    with pytest.raises(ValueError, match="coverage"):
        selection_labels_from_masks(torch.zeros(1, 8, 8), [(2, 2)], coverage=0.0)
