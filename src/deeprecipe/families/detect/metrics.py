"""Detection metrics (torchmetrics MeanAveragePrecision with the pycocotools backend) and box pictures."""

from __future__ import annotations

from pathlib import Path

import torch


class DetectionMetrics:
    """COCO evaluation over a split: mAP@[.5:.95], mAP@.5, mAP@.75, AP by object size (small < 32^2 px area,
    medium < 96^2, large), recall, AP per class, and (extended) precision-recall curves at IoU 0.5."""

    def __init__(self, num_classes: int, extended: bool = False):
        from torchmetrics.detection import MeanAveragePrecision

        self.num_classes = num_classes
        self.m = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=extended, backend="pycocotools"
        )

    def update(self, dets, boxes: torch.Tensor, labels: torch.Tensor) -> None:
        """dets: (boxes (k, 4), scores (k,), labels (k,)) per image; boxes (B, M, 4) and labels (B, M) of the
        truth, -1 padding, ignored(c) = -2 - c a box of class c that counts as COCO's iscrowd (VOC difficult)."""
        preds = [{"boxes": b.float().cpu(), "scores": s.float().cpu(), "labels": y.long().cpu()} for b, s, y in dets]
        target = []
        for b, y in zip(boxes.cpu(), labels.cpu().long()):
            real = y != -1
            crowd = y[real] <= -2
            c = torch.where(crowd, -2 - y[real], y[real])
            target.append({"boxes": b[real].float(), "labels": c, "iscrowd": crowd.long()})
        self.m.update(preds, target)

    def compute(self) -> dict:
        r = self.m.compute()
        out = {k: float(r[k]) for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")}
        ap = [None] * self.num_classes
        classes = r["classes"].flatten().tolist()
        per = r["map_per_class"].flatten().tolist()
        for c, v in zip(classes, per):
            if 0 <= int(c) < self.num_classes:
                ap[int(c)] = None if v < 0 else float(v)
        out["ap_per_class"] = ap
        if "precision" in r:  # (iou thresholds, recall points, classes, area ranges, max detections)
            prec = r["precision"][0, :, :, 0, -1]  # IoU 0.5, all areas, the most detections
            rec = torch.linspace(0, 1, prec.shape[0])
            out["pr_curves"] = {
                int(c): (rec.tolist(), prec[:, k].clamp_min(0).tolist())
                for k, c in enumerate(classes)
                if k < prec.shape[1]
            }
        return out


def draw_boxes(img: torch.Tensor, boxes: torch.Tensor, captions: list[str] | None, colour) -> torch.Tensor:
    """uint8 (3, h, w) with the boxes (k, 4) xyxy drawn and captioned (None: not)."""
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return img
    width = 1 if max(img.shape[-2:]) < 300 else 2
    return draw_bounding_boxes(img, boxes.float(), captions, colors=colour, width=width)


def match_misses(det, boxes: torch.Tensor, labels: torch.Tensor, thresh: float, iou: float = 0.5) -> int:
    """True boxes that no detection of the same class (score >= thresh) covers with IoU >= iou."""
    from torchvision.ops import box_iou

    if len(boxes) == 0:
        return 0
    db, ds, dl = det
    keep = ds >= thresh
    db, dl = db[keep], dl[keep]
    if len(db) == 0:
        return len(boxes)
    hit = (box_iou(boxes.float(), db.float()) >= iou) & (labels[:, None] == dl[None, :])
    return int((~hit.any(1)).sum())


def pr_plot(curves: dict, names: list[str], path: Path) -> None:
    """Precision against recall at IoU 0.5, one line per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for c, (rec, prec) in sorted(curves.items()):
        ax.plot(rec, prec, label=names[c] if c < len(names) else str(c))
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall at IoU 0.5", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
