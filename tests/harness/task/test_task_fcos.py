"""harness/task/fcos.py and detector.py: target assignment, NMS, decoding, the detector's outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import ConfigError, trial_from_dict
from harness.task.detector import build_detector
from harness.task.fcos import FCOSHead, fcos_loss, fcos_postprocess, fcos_targets, level_points, nms
from spa_core import MODEL_VARIANTS
from tests._syncs import count_host_syncs


def test_targets_assign_by_size_centre_and_orphans():
    strides = [8, 16]
    points = level_points([(8, 8), (4, 4)], strides, torch.device("cpu"))
    boxes = torch.tensor(
        [
            [8.0, 8, 40, 40],  # reach <= 64: level 0, centre region of 1.5 strides
            [50.0, 50, 53, 53],  # 3 px: between points -> nearest location only
            [0.0, 0, 64, 64],
        ]
    )  # 32 px reach from its centre... still level 0
    labels = torch.tensor([1, 2, 0])
    cls, box = fcos_targets(points, strides, boxes, labels)
    assert cls.shape == (64 + 16,) and box.shape == (80, 4)
    assert (cls == 2).sum() == 1  # the orphan got exactly one location
    where = (cls == 2).nonzero().item()
    assert torch.allclose(torch.cat(points)[where], torch.tensor([52.0, 52.0]))
    assert (cls == 1).sum() > 0 and (cls[64:] == -1).all()  # nothing big enough for stride 16
    assert torch.equal(box[cls == 1][0], boxes[0])
    big = torch.tensor([[0.0, 0, 200, 200]])
    cls, _ = fcos_targets(points, strides, big, torch.tensor([4]))
    assert (cls[:64] == -1).all() and (cls[64:] == 4).any()  # a box reaching past 64 px goes to stride 16
    cls, box = fcos_targets(points, strides, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert (cls == -1).all() and box.abs().sum() == 0


def test_nms_within_groups_and_cap():
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(b, s, 0.5).tolist() == [3, 2]
    assert nms(b, s, 0.5, groups=torch.tensor([0, 0, 0, 1])).tolist() == [3, 0, 2]
    assert nms(b, s, 0.5, groups=torch.tensor([0, 0, 0, 1]), max_keep=2).tolist() == [3, 0]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_head_learns_one_box_and_decodes_it():
    """A head over fixed random features overfits one box; post-processing finds it, in input pixels."""
    torch.manual_seed(0)
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    head = FCOSHead([8, 16], [8, 16], num_classes=3, channels=16)
    target = [{"boxes": torch.tensor([[12.0, 20, 36, 44]]), "labels": torch.tensor([2])}]
    opt = torch.optim.Adam(head.parameters(), 2e-2)
    for _ in range(60):
        parts = fcos_loss(*head(feats), [8, 16], target)
        loss = parts["cls"] + parts["box"] + parts["ctr"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    det = fcos_postprocess(*head(feats), [8, 16], (64, 64), score_thresh=0.3)[0]
    assert det["labels"][0] == 2 and det["scores"][0] > 0.5
    iou_box = det["boxes"][0]
    inter = (
        (
            torch.minimum(iou_box[2:], target[0]["boxes"][0, 2:])
            - torch.maximum(iou_box[:2], target[0]["boxes"][0, :2])
        )
        .clamp(min=0)
        .prod()
    )
    union = (iou_box[2:] - iou_box[:2]).prod() + 24 * 24 - inter
    assert inter / union > 0.7


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_detector_outputs(variant):
    cfg = trial_from_dict({"preset": "micro", "model": {"variant": variant}})
    torch.manual_seed(0)
    model = build_detector(cfg)
    images = torch.randn(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[4.0, 4, 30, 40]]), "labels": torch.tensor([3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    out = model(images, targets)
    assert {"loss", "task_loss", "gate_loss", "backbone", "selection_labels"} <= set(out)
    assert "detections" not in out  # training mode with targets: no post-processing
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    if out["backbone"].blocks:
        assert set(out["selection_labels"]) == {b.grid for b in out["backbone"].blocks}
    else:
        assert out["selection_labels"] is None and out["gate_loss"] == 0
    model.eval()
    with torch.no_grad():
        dets = model(images)["detections"]
    assert len(dets) == 2
    for d in dets:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) <= cfg.head.max_detections
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all() and (d["labels"] < 10).all()


def test_detector_rejects_bad_head_config():
    with pytest.raises(ValueError, match="increasing"):
        build_detector(trial_from_dict({"preset": "micro", "head": {"in_stages": [4, 2]}}))
    with pytest.raises(ValueError, match="head.type"):
        build_detector(trial_from_dict({"preset": "micro", "head": {"type": "yolo"}}))


def test_spa_stages_the_head_does_not_read_are_refused():
    """SPA blocks after the head's last stage would select tokens that reach no detection and no loss."""
    with pytest.raises(ConfigError, match=r"stage\(s\) \[4\].*head.in_stages \[2, 3\]"):
        trial_from_dict({"preset": "micro", "model": {"spa_stages": [3, 4]}, "head": {"in_stages": [2, 3]}})
    assert trial_from_dict({"preset": "micro", "model": {"spa_stages": [3]}, "head": {"in_stages": [2, 3]}})
    dense = trial_from_dict({"preset": "micro", "model": {"variant": "dense"}, "head": {"in_stages": [2, 3]}})
    assert dense.model.is_dense  # no SPA blocks: any stages
    assert trial_from_dict({"preset": "micro"}).head.in_stages == (
        2,
        3,
        4,
    )  # the default reads every SPA stage


@pytest.mark.parametrize("split", [1, 2, 3])
def test_the_normaliser_averaged_over_ranks_gives_the_global_batch_loss(split):
    """Two ranks holding parts of one batch with different numbers of objects: with the positive
    count averaged over the ranks (``count_mean``), the mean of the ranks' losses (what data
    parallelism's gradient averaging optimises) is the loss of the whole batch. Normalised per rank,
    it is not: a rank with one object would weigh as much as one with many."""
    torch.manual_seed(0)
    strides = [8, 16]
    head = FCOSHead([8, 8], strides, num_classes=3, channels=8)
    feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 4, 4)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4, 30, 30]] * n) + torch.arange(n)[:, None] * 5,
            "labels": torch.arange(n) % 3,
        }
        for n in (1, 5, 2, 0)
    ]
    cls, ltrb, ctr = head(feats)

    def part(lo, hi, count_mean=None):
        out = fcos_loss([c[lo:hi] for c in cls], [x[lo:hi] for x in ltrb], [x[lo:hi] for x in ctr], strides,
                        targets[lo:hi], count_mean=count_mean)  # fmt: skip
        return out, sum(out[k] for k in ("cls", "box", "ctr"))

    whole, total = part(0, 4)
    (pa, _), (pb, _) = part(0, split), part(split, 4)
    mean_count = (pa["num_pos"] + pb["num_pos"]) / 2  # what all_reduce-mean gives each rank
    assert pa["num_pos"] != pb["num_pos"]
    _, la = part(0, split, lambda c: mean_count)
    _, lb = part(split, 4, lambda c: mean_count)
    torch.testing.assert_close((la + lb) / 2, total)
    (_, la_local), (_, lb_local) = part(0, split), part(split, 4)
    assert not torch.allclose((la_local + lb_local) / 2, total)  # per-rank normalisers differ


# --- no host sync in target assignment and the loss; the same targets and loss as the per-box way ----
def _orphans_ref(pts, per_level, strides, boxes, cand):
    """What target assignment did before: a Python loop over the boxes no location learns from."""
    from harness.task.fcos import level_ranges

    half = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    offsets = [0]
    for n in per_level:
        offsets.append(offsets[-1] + n)
    cand = cand.clone()
    for m in (~cand.any(0)).nonzero().flatten().tolist():
        lvl = next(i for i, (lo, hi) in enumerate(level_ranges(strides)) if half[m] <= hi)
        a, b = offsets[lvl], offsets[lvl + 1]
        d = (pts[a:b, 0] - cx[m]) ** 2 + (pts[a:b, 1] - cy[m]) ** 2
        cand[a + int(d.argmin()), m] = True
    return cand


def _loss_ref(cls, ltrb, ctr, strides, targets):
    """The loss as it was computed before: the positive locations gathered (boolean indexing)."""
    import torch.nn.functional as F

    from harness.task.fcos import _flatten, _focal_loss, _giou_loss

    points = level_points([x.shape[-2:] for x in cls], strides, cls[0].device)
    pts = torch.cat(points)
    cls_f, ltrb_f, ctr_f = _flatten(cls).float(), _flatten(ltrb).float(), _flatten(ctr).float()[..., 0]
    tc, tb = zip(*(fcos_targets(points, strides, t["boxes"], t["labels"]) for t in targets))
    tcls, tbox = torch.stack(tc), torch.stack(tb)
    pos = tcls >= 0
    num_pos = max(1.0, float(pos.sum()))
    onehot = torch.zeros_like(cls_f)
    onehot[pos] = F.one_hot(tcls[pos], cls_f.shape[-1]).to(onehot)
    out = {"cls": _focal_loss(cls_f, onehot) / num_pos}
    if not pos.any():
        return {**out, "box": torch.tensor(0.0), "ctr": torch.tensor(0.0)}
    p_xy = pts[None].expand(len(targets), -1, -1)[pos]
    d = ltrb_f[pos]
    gt = tbox[pos]
    out["box"] = _giou_loss(torch.cat([p_xy - d[:, :2], p_xy + d[:, 2:]], 1), gt).sum() / num_pos
    lr_ = torch.stack([p_xy[:, 0] - gt[:, 0], gt[:, 2] - p_xy[:, 0]], 1).clamp(min=0)
    tb_ = torch.stack([p_xy[:, 1] - gt[:, 1], gt[:, 3] - p_xy[:, 1]], 1).clamp(min=0)
    c = torch.sqrt(
        (lr_.min(1).values / lr_.max(1).values.clamp(min=1e-6))
        * (tb_.min(1).values / tb_.max(1).values.clamp(min=1e-6))
    )
    out["ctr"] = F.binary_cross_entropy_with_logits(ctr_f[pos], c, reduction="sum") / num_pos
    return out


@st.composite
def _image_boxes(draw, size=64):
    """Up to 6 boxes anywhere on a ``size`` image, tiny ones (between points: orphans) included."""
    n = draw(st.integers(0, 6))
    boxes = []
    for _ in range(n):
        x0, y0 = draw(st.floats(0, size - 1)), draw(st.floats(0, size - 1))
        w, h = draw(st.floats(0.5, size)), draw(st.floats(0.5, size))
        boxes.append([x0, y0, min(size, x0 + w), min(size, y0 + h)])
    labels = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


@pytest.mark.slow  # 40 examples of a head's forward and the loss twice: over a minute on a shared CPU
@given(images=st.lists(_image_boxes(), min_size=1, max_size=3), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_targets_and_loss_as_before_without_a_host_sync(images, seed):
    from harness.task import fcos as fcos_mod

    torch.manual_seed(seed)
    strides = [8, 16, 32]
    points = level_points([(8, 8), (4, 4), (2, 2)], strides, torch.device("cpu"))
    pts = torch.cat(points)
    for t in images:  # the orphans get the locations the per-box loop gave them
        if len(t["boxes"]):
            b = t["boxes"]
            nearest = fcos_mod._nearest_locations(pts, [64, 16, 4], fcos_mod.level_ranges(strides), b)
            base = torch.zeros(len(pts), len(b), dtype=torch.bool)
            assert torch.equal(
                base | (nearest & ~base.any(0, keepdim=True)),
                _orphans_ref(pts, [64, 16, 4], strides, b, base),
            )
    head = FCOSHead([8, 8, 8], strides, num_classes=3, channels=8)
    feats = [torch.randn(len(images), 8, s, s) for s in (8, 4, 2)]
    cls, ltrb, ctr = head(feats)
    with count_host_syncs() as syncs:
        out = fcos_loss(cls, ltrb, ctr, strides, images)
    assert syncs.seen == []
    ref = _loss_ref(cls, ltrb, ctr, strides, images)
    for k in ("cls", "box", "ctr"):
        torch.testing.assert_close(out[k], ref[k].to(out[k]), rtol=1e-5, atol=1e-6)
    total = out["cls"] + out["box"] + out["ctr"]
    total.backward()  # every output in the graph, positives or not
    assert all(p.grad is not None for p in head.parameters())
