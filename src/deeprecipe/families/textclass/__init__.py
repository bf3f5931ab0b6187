"""Text classification: what a batch is, the loss, the metrics and plot, predict, serve and export.

A batch is (token ids (B, T) padded with PAD after each text, labels (B,)); data/textclass.py makes it and
models/textclass.py classifies it. `prepare` cuts a batch to its longest text, so short texts do not run at
the data's max_len (the models give a text the same logits whatever padding follows it). The metrics are
accuracy, macro-F1 (the mean of the per-class F1, so a rare class weighs as much as a common one) and the
confusion matrix; a finished run plots the test split's (plots/confusion.png).

Predict and serve tokenize with the tokenizer saved in the run's spec.json: characters a char vocabulary
lacks are dropped, and a text left with no token is an error. The recipe checks run as built in: the loss at
init is ln C, the per-example loss is the cross-entropy of model(ids), and the baseline's blanked input,
token 0 everywhere, is all PAD (an empty text), which a model that reads its text must beat.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecipe.common.classes import predict_split, top_labels
from deeprecipe.config import Config
from deeprecipe.core import DataSpec, UserError
from deeprecipe.data.core import Data
from deeprecipe.data.pairs import pad, read_lines
from deeprecipe.data.text import tokenizer_from_spec
from deeprecipe.data.textclass import PAD, encode
from deeprecipe.family import ExplainOptions, Family, PredictOptions, ServeContext
from deeprecipe.runtime import Runtime


def prepare(batch, spec: DataSpec, draws=None):
    """Ids cut to the batch's longest text (at least one column); labels unchanged. No augmentation."""
    x, y = batch
    return x[:, : max(1, int((x != PAD).sum(1).max()))], y


def metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
    )

    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "acc": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
        "macro_f1": multiclass_f1_score(logits, labels, num_classes, average="macro").item(),
        "confusion": multiclass_confusion_matrix(logits, labels, num_classes).tolist(),
    }


def text_ids(tok, spec: DataSpec, text: str, where: str) -> list[int]:
    ids = encode(tok, [text], int(spec.extra["max_len"]))[0]
    if not ids:
        raise UserError(f"{where}: no character of the text is in the model's vocabulary")
    return ids


@torch.no_grad()
def classify_ids(model: nn.Module, rt: Runtime, ids: list[list[int]]) -> list[torch.Tensor]:
    """Texts as token ids -> class probabilities (C,) each, in one padded batch; what predict and /classify-text
    both run, so the same text gets the same answer."""
    with rt.autocast():
        return list(model(pad(ids, rt.device)).float().softmax(-1).cpu())


class TextClassify(Family):
    """Text classification (see the module docstring)."""

    METRIC = ("acc", "max")
    prepare = staticmethod(prepare)

    def loss(self, model: nn.Module, batch, cfg: Config, part: str):
        x, y = batch
        return F.cross_entropy(model(x).float(), y, label_smoothing=cfg.optim.label_smoothing), {}

    def evaluate(self, model: nn.Module, data: Data, split: str, cfg: Config, rt: Runtime, final: bool) -> dict:
        return metrics(*predict_split(model, data, split, cfg, rt, prepare), data.spec.num_classes)

    def finish(self, model: nn.Module, data: Data, cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
        """Test metrics (val when there is no test split) and their confusion matrix."""
        from deeprecipe.engine import plots

        split = data.final_split()
        model.eval()
        with torch.no_grad(), rt.autocast():
            m = metrics(*predict_split(model, data, split, cfg, rt, prepare), data.spec.num_classes)
        path = Path(run_dir) / "plots" / "confusion.png"
        plots.confusion(m["confusion"], data.spec.class_names, path, f"{split} confusion matrix")
        return {f"{split}_{k}": v for k, v in m.items() if k != "confusion"}

    def predict(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: PredictOptions
    ) -> list[dict]:
        """Text files (one text each) -> top-k labels with probabilities."""
        tok = tokenizer_from_spec(spec)
        ids = [text_ids(tok, spec, "\n".join(read_lines(Path(f))).strip(), f) for f in files]
        probs = classify_ids(model, rt, ids)
        return [top_labels(f, p, spec.class_names, opts.top) for f, p in zip(files, probs)]

    def explain(
        self, model: nn.Module, spec: DataSpec, cfg: Config, rt: Runtime, files: list[str], opts: ExplainOptions
    ) -> list[dict]:
        """Text files -> per-token attributions of the predicted (or --target) class: Integrated Gradients on the
        token embedding's output from an all-PAD text; "tokens" is [(token, score), ...] in text order."""
        from deeprecipe.engine import explain as ex

        ex.check_method(opts.method, ("ig",), "a text classifier")
        if opts.target is not None and not 0 <= opts.target < spec.num_classes:
            raise UserError(f"explain --target {opts.target}: the model has classes 0..{spec.num_classes - 1}")
        tok = tokenizer_from_spec(spec)
        ids = [text_ids(tok, spec, "\n".join(read_lines(Path(f))).strip(), f) for f in files]
        probs = classify_ids(model, rt, ids)
        net = ex.safe_copy(model)
        results = []
        for f, t, p in zip(files, ids, probs):
            c = int(p.argmax()) if opts.target is None else opts.target
            label = spec.class_names[c]
            r = {"file": f, "label": label, "target": c, "method": "ig", "score": round(float(p[c]), 4)}
            r |= ex.token_explanation(net, f, t, c, PAD, tok.decode, opts.sanity, opts.out)
            r["text"] = f"{f}: {label} ({r['score']:.3f}) ig: {r.pop('top')}"
            results.append(r)
        return results

    def export_example(self, model: nn.Module, spec: DataSpec, batch: int) -> dict:
        """Token ids (B, T), batch and time dynamic; the first text is shorter (PAD after it)."""
        g = torch.Generator().manual_seed(batch)
        T = min(16, int(spec.extra["max_len"]))
        ids = torch.randint(1, spec.vocab_size, (batch, T), generator=g)
        ids[0, T // 2 + 1 :] = PAD
        return {"inputs": {"tokens": ids}, "outputs": ["logits"], "dynamic": {"tokens": {0: "batch", 1: "time"}}}

    def show_batch(self, batch, spec: DataSpec) -> str:
        """The first texts of a prepared batch with their labels (deeprecipe check)."""
        tok, names = tokenizer_from_spec(spec), spec.class_names
        x, y = batch
        rows = [f"{names[int(y[i])]}: {tok.decode([t for t in x[i].tolist() if t != PAD])!r}" for i in range(len(x))]
        return "\n".join(rows[:16]) + "\n"

    def serve(self, ctx: ServeContext) -> None:
        """POST /classify-text {"text", "top"} -> {label, prob, top}; concurrent requests run as one batch."""
        from fastapi import HTTPException
        from pydantic import BaseModel, ConfigDict, Field

        spec, tok = ctx.spec, tokenizer_from_spec(ctx.spec)

        class TextIn(BaseModel):
            model_config = ConfigDict(extra="forbid")
            text: str = Field(..., min_length=1, max_length=100_000, description="the text to classify")
            top: int = Field(3, ge=1, le=max(1, spec.num_classes), description="labels to return")

        batch = ctx.batcher("classify-text", lambda ids: classify_ids(ctx.model, ctx.rt, ids))

        @ctx.router.post("/classify-text", summary="Classify a text")
        async def classify_text(req: TextIn):
            try:
                ids = text_ids(tok, spec, req.text, "the text")
            except UserError as e:
                raise HTTPException(400, str(e)) from None
            r = top_labels("", await batch(ids), spec.class_names, req.top)
            return {"label": r["label"], "prob": r["prob"], "top": r["top"]}

        ctx.widget("/classify-text", "text", "Classify a text", button="Classify")
