"""The public Python API: what the `deeprecipe` command does, as functions and a `Run` object.

    import deeprecipe

    run = deeprecipe.train("digits-cnn", {"train.steps": 200}, out="runs/digits")
    run.metrics[-1]                     # the last row of metrics.jsonl, as a dict
    run.evaluate()                      # {"acc": ..., "top5": ..., "precision": [...], ...} on the test split
    run.predict(["seven.png", pil_image, array, tensor])   # the records of `deeprecipe predict --json`
    run.export("onnx")                  # Path of the exported file, checked against PyTorch
    deeprecipe.load("runs/digits").predict("seven.png")

The CLI's train, eval, predict and sample verbs call these functions, so a notebook and the command take one path
and raise the same one-line errors (UserError, ConfigError, DataError from deeprecipe.core) that the CLI prints.
Nothing here prints: notes are `warnings.warn`, and training's progress bar is tqdm.auto's (a widget in a notebook).
This module sits beside the CLI (imports point down from both): it imports the families, the engine, checks, serve
and the recipe loader, never the CLI.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeprecipe.config import Config, dump, list_recipes, to_dict, with_overrides
from deeprecipe.core import DataError, UserError, one_line

if TYPE_CHECKING:
    from torch import nn

    from deeprecipe.checks.core import Verdict
    from deeprecipe.core import DataSpec
    from deeprecipe.engine.checkpoint import About
    from deeprecipe.family import Family
    from deeprecipe.runtime import Runtime

Overrides = Mapping[str, Any] | Iterable[str] | None
PREDICT_CHUNK = 64  # inputs per call of the family's predict hook (one batch)


# ------------------------------------------------------------------------------------------ recipes and configs


def recipes() -> dict[str, str]:
    """The built-in recipes: name -> one-line description."""
    return list_recipes()


def override_list(overrides: Overrides) -> list[str]:
    """`{"train.steps": 20}` or `["train.steps=20"]` -> ["train.steps=20"], the CLI's `--set` strings. A dict's
    values are written as JSON (which YAML reads back as the same value), so a Python str stays a string."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise UserError(f"overrides {overrides!r}: give a dict {{'section.key': value}} or a list of 'key=value'")
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            if not isinstance(key, str) or "=" in key:
                raise UserError(f"override key {key!r}: use a dotted config path such as 'optim.lr'")
            out.append(f"{key}={json.dumps(value, default=str)}")
        return out
    out = list(overrides)
    for item in out:
        if not isinstance(item, str):
            raise UserError(f"override {item!r}: a list of overrides holds 'section.key=value' strings")
    return out


def configure(recipe: str | Path | Config, overrides: Overrides = None, device: str | None = None) -> Config:
    """The typed Config of a recipe (a built-in name, a YAML path, or a Config) with overrides applied, as
    `train` would run it; an unknown key or a wrong type raises a ConfigError naming the nearest key."""
    from deeprecipe.recipe import load as load_recipe
    from deeprecipe.recipe import resolve

    sets = override_list(overrides) + ([f"train.device={device}"] if device else [])
    if isinstance(recipe, Config):
        return resolve(with_overrides(to_dict(recipe), sets), recipe.recipe)
    if not isinstance(recipe, (str, Path)):
        raise UserError(f"recipe {recipe!r}: give a recipe name (deeprecipe.recipes()), a YAML path or a Config")
    return load_recipe(str(recipe), sets)


# ------------------------------------------------------------------------------------------ train and load


def train(
    recipe: str | Path | Config | None,
    overrides: Overrides = None,
    out: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    *,
    command: str = "",
    monitor: Callable[[int, dict], bool] | None = None,
) -> Run:
    """Train a recipe (a built-in name, a YAML path or a Config) into a new run folder `out` (default
    runs/<recipe>-<time>), or with `resume=True` continue the run folder given as `recipe` (or `out`) from its last
    checkpoint, exactly. `overrides`: {"train.steps": 20} or ["train.steps=20"]; `device`: auto | cpu | cuda | mps.
    `command` is the line recorded in the run's commands.txt (default: this call, in Python); `monitor(step,
    results)` is called after each evaluation, and returning True stops the run there (status "pruned").
    A new run that fails before its first checkpoint leaves no folder behind."""
    from deeprecipe.engine.loop import train as train_loop
    from deeprecipe.engine.run import new_run_dir, read_config

    sets = override_list(overrides) + ([f"train.device={device}"] if device else [])
    if resume:
        if recipe is None and out is None:
            raise UserError("resume needs the run folder to continue (--resume RUN)")
        if isinstance(recipe, Config):
            raise UserError("resume continues a run folder: give its path, not a Config")
        run_dir = Path(out if recipe is None else recipe)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml)")
        cfg = read_config(run_dir, sets)
    else:
        if recipe is None:
            raise UserError("train needs a recipe (see 'deeprecipe recipes') or --resume RUN")
        cfg = configure(recipe, sets)
        run_dir = new_run_dir((cfg.recipe or "run") if isinstance(recipe, Config) else str(recipe), out)
        if (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir} already holds a run: use --resume {run_dir}, or another --out")
    command = command or _python_call("train", recipe, overrides, out, device, resume)
    family = _family(cfg)
    existed = run_dir.exists()
    try:
        final = train_loop(cfg, family, run_dir, resume=resume, command=command, monitor=monitor)
    except BaseException:
        if "mlflow" in cfg.train.loggers:
            from deeprecipe.engine.tracking import end_failed

            with contextlib.suppress(Exception):  # the training error is the one to show
                end_failed(run_dir)
        # nothing half-written: a new run that never reached a checkpoint leaves no folder behind
        if not existed and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Run(run_dir, final=final, _family=family)


def load(run_dir: str | Path, device: str = "auto", precision: str | None = None) -> Run:
    """A trained (or training) run folder with its model loaded: the weights every verb uses (the best evaluated,
    else the last checkpoint). `precision` (auto | bf16 | fp16 | fp32) applies to every method; None keeps each
    verb's default (fp32 for predict, as the server answers; auto for evaluate, sample and translate)."""
    run = Run(run_dir, device=device, precision=precision)
    run.model  # noqa: B018 (loads now: a broken run fails here, not at the first prediction)
    return run


def check(
    recipe: str | Path | Config,
    overrides: Overrides = None,
    out: str | Path | None = None,
    device: str | None = None,
    only: Iterable[str] = (),
    skip: Iterable[str] = (),
    steps: int | None = None,
    batch: int | None = None,
    overfit_steps: int | None = None,
    max_files: int = 2000,
    strict: bool = False,
    progress: Callable[[Verdict], None] | None = None,
    debug: bool = False,
) -> list[Verdict]:
    """The training recipe's checks on a recipe (`deeprecipe check`): one Verdict per check (name, status pass |
    warn | fail | skip, measured, expected, advice, value, plots), in order; `progress(verdict)` sees each as it
    comes. Writes config.yaml, plots/, checks.json, status.json ("check failed" on a failure, or with `strict` a
    warning) and report.html into `out` (default runs/check-<recipe>-<time>). `debug`: a check that raises
    re-raises instead of failing."""
    from deeprecipe.checks import CHECKS, Ctx, run_checks
    from deeprecipe.checks.page import write_page
    from deeprecipe.engine.atomic import atomic_text
    from deeprecipe.engine.run import new_run_dir

    cfg = configure(recipe, overrides, device)
    family = _family(cfg)
    only, skip = list(only), list(skip)
    known = [*CHECKS, *family.EXTRA_CHECKS]
    for name in only + skip:
        if name not in known:
            raise UserError(f"unknown check '{name}': the checks are {', '.join(known)}")
    name = (cfg.recipe or "run") if isinstance(recipe, Config) else str(recipe)
    run_dir = new_run_dir(f"check-{Path(name).stem}", str(out) if out else None)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    atomic_text(run_dir / "config.yaml", dump(cfg))
    ctx = Ctx(cfg, run_dir, family, steps=steps, batch_size=batch, overfit_steps=overfit_steps, max_files=max_files)
    ctx.debug = debug
    verdicts = run_checks(ctx, only, skip, progress=progress)
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "warn", "fail", "skip")}
    failed = counts["fail"] > 0 or (strict and counts["warn"] > 0)
    atomic_text(run_dir / "checks.json", json.dumps([asdict(v) for v in verdicts], indent=1))
    status = {"status": "check failed" if failed else "check passed", "recipe": cfg.recipe, "task": cfg.task}
    atomic_text(run_dir / "status.json", json.dumps(status | {"counts": counts}))
    write_page(run_dir, f"deeprecipe check {cfg.recipe}", verdicts, dump(cfg))
    return verdicts


def dataset(recipe: str | Path | Config, overrides: Overrides = None) -> Any:
    """The recipe's data set as training builds it (on the CPU): `.spec` (DataSpec: classes, image size,
    normalization, vocabulary) and the splits `.train`, `.val`, `.test` (None when absent); a tensor split holds
    `.tensors`, e.g. images (N, C, H, W) uint8 and labels (N,)."""
    return configure(recipe, overrides).data.build()


def model(recipe: str | Path | Config, spec: DataSpec, overrides: Overrides = None) -> nn.Module:
    """A fresh, untrained model of the recipe for data described by `spec` (dataset(...).spec): a plain nn.Module
    on the CPU, initialized from torch's current random state (seed it with torch.manual_seed)."""
    cfg = configure(recipe, overrides)
    return _family(cfg).build_model(cfg, spec)


def time_step(recipe: str | Path | Config, overrides: Overrides = None, probes: int = 4) -> tuple[float, float]:
    """(seconds to build the data, median seconds of one training step) of a recipe on its train.device: the
    loop's own step (every part of the family: a GAN's D and G turns too) on the recipe's model and batch, for
    fitting a step count to a time budget. The first step (warm-up) is not counted; the steps run eagerly (on a GPU
    the loop may replay its step as a CUDA graph, which is faster)."""
    import time

    import torch

    from deeprecipe.data.core import Draws
    from deeprecipe.engine.device import setup
    from deeprecipe.engine.loop import build, make_parts, train_step

    cfg = configure(recipe, overrides)
    rt = setup(cfg.train.device, cfg.train.precision)
    family = _family(cfg)
    t0 = time.perf_counter()
    data, net = build(cfg, family, rt)
    t_data = time.perf_counter() - t0
    parts = make_parts(family, net, cfg, rt)
    times = []
    for s in range(probes + 1):
        if hasattr(data.train, "step_batch"):  # text windows, length-bucketed sentence pairs
            raw = tuple(t.to(rt.device) for t in data.train.step_batch(cfg.train.seed, s, cfg.train.batch_size))
        else:
            raw = data.train.take(
                torch.arange(s * cfg.train.batch_size, (s + 1) * cfg.train.batch_size) % len(data.train)
            )
        batch = family.prepare(raw, data.spec, Draws(torch.Generator().manual_seed(s)))
        t = time.perf_counter()
        train_step(family, net, parts, [batch], cfg, rt)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return t_data, sorted(times[1:])[len(times[1:]) // 2]


# ------------------------------------------------------------------------------------------ a run


class Run:
    """A run folder and, loaded on first use, its model: `dir`, `config`, `metrics` (metrics.jsonl rows),
    `final` (the metrics training returned), `predict`, `evaluate`, `export`, `sample`, `translate`."""

    def __init__(
        self,
        run_dir: str | Path,
        device: str = "auto",
        precision: str | None = None,
        final: dict | None = None,
        _family: Family | None = None,
    ):
        from deeprecipe.engine.run import read_config, read_status

        self.dir = Path(run_dir)
        self.config: Config = read_config(self.dir)
        self.device, self.precision = device, precision
        self.final: dict = final if final is not None else dict(read_status(self.dir).get("final") or {})
        self._family_obj = _family
        self._loaded: tuple | None = None
        self._runtimes: dict[str, Runtime] = {}
        self._data = None  # built by the first evaluate

    def __repr__(self) -> str:
        return f"Run('{self.dir}', task={self.config.task!r}, recipe={self.config.recipe!r})"

    # -------------------------------------------------------------------- what the folder holds
    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (one per log step and evaluation), read afresh on each access."""
        from deeprecipe.engine.run import read_metrics

        return read_metrics(self.dir)

    @property
    def status(self) -> dict:
        """status.json: running | done | failed | pruned, the step, the best evaluation, the final metrics."""
        from deeprecipe.engine.run import read_status

        return read_status(self.dir)

    @property
    def weights(self) -> About:
        """Which weights are the run's model (file, step, text), without loading them."""
        from deeprecipe.engine.checkpoint import model_weights

        return model_weights(self.dir, load=False)[1]

    @property
    def family(self) -> Family:
        if self._family_obj is None:
            self._family_obj = _family(self.config)
        return self._family_obj

    # -------------------------------------------------------------------- the model
    def _load(self) -> tuple:
        if self._loaded is None:
            from deeprecipe.engine.run import load_run

            self._loaded = load_run(self.dir, self.family, self.device, self.precision or "auto")
        return self._loaded

    @property
    def model(self) -> nn.Module:
        """The run's model in eval mode on `device`."""
        return self._load()[2]

    @property
    def spec(self) -> DataSpec:
        return self._load()[1]

    def runtime(self, default: str = "auto") -> Runtime:
        """Device and autocast dtype for a call: the run's precision, else the verb's `default`."""

        from deeprecipe.engine.device import pick_dtype

        precision = self.precision or default
        if precision not in self._runtimes:  # picked once per precision (auto may measure the CPU, and says so)
            rt = self._load()[3]
            dtype, why = pick_dtype(rt.device, precision)
            self._runtimes[precision] = replace(rt, dtype=dtype, why=why)
        return self._runtimes[precision]

    # -------------------------------------------------------------------- verbs
    def evaluate(self, split: str | None = None) -> dict:
        """The family's metrics of the run's model over a whole split, and "split": the split evaluated (default
        the one a finished run is scored on: test, else val, else train), in the run's own precision unless `load`
        was given one (so a finished run's figures come back exactly). `deeprecipe eval --json` prints this dict
        with the weights' text and step added. The data set is built on the first call and kept for the next."""
        from deeprecipe.engine.loop import evaluate

        if split not in (None, "train", "val", "test"):
            raise UserError(f"split {split!r}: use train, val or test")
        rt = self.runtime(self.config.train.precision)  # as training scored it: the same figures
        if self._data is None:
            self._data = self.config.data.build()
            for name in ("train", "val", "test"):
                s = getattr(self._data, name)
                if s is not None:
                    s.to(rt.device)
        data = self._data
        split = split or data.final_split()
        if getattr(data, split) is None:
            raise UserError(f"{self.dir}: the data set has no {split} split")
        return evaluate(self.family, self.model, data, self.config, rt, split) | {"split": split}

    def predict(
        self, inputs: Any, top: int = 3, out: str | Path | None = None, errors: str = "raise", stream: bool = False
    ) -> list[dict] | Iterator[dict]:
        """The records of `deeprecipe predict --json`, one per input, in order. `inputs`: one input or a list of
        them, each a file path, a PIL image, a numpy array ((H, W) or (H, W, C)) or a tensor ((C, H, W)) of an
        image, or a str that is no file (the text itself, for the text families). In-memory inputs are written to
        a temporary folder as PNG / .txt for the family's predict hook; their records name them '<input N>'.
        `errors="record"` turns an input that cannot be used into {"file", "error"} and goes on; `stream=True`
        yields the records as each batch is done."""
        if errors not in ("raise", "record"):
            raise UserError(f"errors={errors!r}: use raise or record")
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        it = self._predict(items, top, out, errors)
        return it if stream else list(it)

    def _predict(self, items: list, top: int, out: str | Path | None, errors: str) -> Iterator[dict]:
        import torch

        from deeprecipe.family import PredictOptions

        family, spec, cfg, model, rt = self.family, self.spec, self.config, self.model, self.runtime("fp32")
        opts = PredictOptions(top=top, out=Path(out) if out else None)
        with tempfile.TemporaryDirectory(prefix="deeprecipe-predict-") as tmp:
            files, shown = _as_files(items, Path(tmp), text=bool(spec.vocab_size))
            for i in range(0, len(files), PREDICT_CHUNK):
                chunk = files[i : i + PREDICT_CHUNK]
                try:
                    with torch.no_grad():
                        got = family.predict(model, spec, cfg, rt, chunk, opts)
                except DataError:  # the chunk again one file at a time, recording the bad ones
                    if errors == "raise":
                        raise
                    got = []
                    for f in chunk:
                        try:
                            with torch.no_grad():
                                got += family.predict(model, spec, cfg, rt, [f], opts)
                        except DataError as e:
                            got.append({"file": f, "error": one_line(e)})
                yield from (_renamed(r, shown) for r in got)

    def sample(
        self,
        prompt: str = "",
        max_tokens: int = 500,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        n: int = 64,
        seed: int = 0,
        out: str | Path | None = None,
        stream: bool = False,
    ) -> str | list[Path] | Iterator[str]:
        """Generate (`deeprecipe sample`): a language model's text (the prompt and its continuation), or a GAN's
        images written to `out` (default RUN/samples; an image file name: the grid alone) as their paths.
        `stream=True` yields the family's text pieces as they come instead (what the CLI shows)."""
        import torch

        from deeprecipe.family import SampleOptions

        if not 0 <= seed < 2**64:  # what torch.Generator takes (the server refuses the same range)
            raise UserError(f"--seed {seed}: must be in 0 .. 2**64 - 1")
        opts = SampleOptions(prompt, max_tokens, temperature, top_k, top_p, n, seed, Path(out) if out else None)
        opts.run_dir = self.dir
        model, spec, rt = self.model, self.spec, self.runtime("auto")  # errors now, not at the first piece

        def pieces() -> Iterator[str]:
            with torch.no_grad():
                yield from self.family.sample(model, spec, self.config, rt, opts)

        if stream:
            return pieces()
        text = "".join(pieces())
        if self.spec.vocab_size:
            return text
        where = opts.out or self.dir / "samples"  # the GAN hook's layout: a grid file, or NNNN.png in a folder
        if where.suffix:
            return [where]
        return [p for p in (where / f"{i:04d}.png" for i in range(n)) if p.is_file()]

    def translate(self, sentences: str | Iterable[str], beam: int | None = None, length_penalty: float | None = None):
        """A translation run's translations of one sentence (-> str) or a list of them (-> list[str]); beam and
        length penalty default to the run's model.beam and model.length_penalty."""
        from deeprecipe.families import translate

        if self.config.task != "translate":
            raise UserError(f"{self.dir} is a '{self.config.task}' run; translate needs a translation run")
        one = isinstance(sentences, str)
        lines = [sentences] if one else list(sentences)
        beam = beam if beam is not None else getattr(self.config.model, "beam", 4)
        alpha = length_penalty if length_penalty is not None else getattr(self.config.model, "length_penalty", 0.6)
        got = translate.translate_lines(self.model, self.spec, lines, self.runtime("auto"), beam, alpha)
        return got[0] if one else got

    def export(
        self, format: str = "onnx", out: str | Path | None = None, atol: float = 1e-4, rtol: float = 1e-3
    ) -> Path:
        """Export the run's model (on the CPU, fp32) to ONNX or TorchScript (default RUN/export/model.onnx|.pt) and
        check the file against PyTorch within atol + rtol; the exported file's path."""
        from deeprecipe.engine.run import load_run
        from deeprecipe.serve.export import export_run

        _, spec, model, _ = load_run(self.dir, self.family, "cpu", "fp32")  # export casts and moves its own copy
        summary = export_run(str(self.dir), self.family, model, spec, format, str(out) if out else None, atol, rtol)
        return Path(summary["files"][0])

    def quantize(
        self, out: str | Path | None = None, calibration: int = 256, stem: bool | None = None, timing_s: float = 1.0
    ) -> dict:
        """`export --int8`: the float ONNX file and its int8 twin (static quantization calibrated on `calibration`
        training examples), both scored on the test split and timed at batch 1 and 32 in onnxruntime; the summary
        (also in RUN/export/model.int8.json). `stem`: keep a first convolution of <= 3 input channels float (True),
        quantize it (False), or keep whichever file is faster on this CPU (None)."""
        from deeprecipe.engine.run import load_run
        from deeprecipe.serve.export import int8_inputs, quantize_run

        cfg, spec, model, _ = load_run(self.dir, self.family, "cpu", "fp32")
        int8_inputs(self.family, model, spec)  # refuses before the data is read
        o = str(out) if out else None
        return quantize_run(
            str(self.dir), self.family, model, spec, cfg.data.build(), o, calibration, timing_s=timing_s, stem=stem
        )


# ------------------------------------------------------------------------------------------ helpers


def _family(cfg: Config) -> Family:
    from deeprecipe.families import get_family

    return get_family(cfg.task)


def _python_call(verb: str, *args: Any) -> str:
    """This call as a line of Python, for the run's commands.txt."""
    shown = ", ".join(repr(str(a) if isinstance(a, Path) else a) for a in args)
    return f"deeprecipe.{verb}({shown})"


def _as_files(items: list, tmp: Path, text: bool) -> tuple[list[str], dict[str, str]]:
    """Inputs -> (file paths for a family's predict hook, temporary file -> the name its record shows). A path (or a
    str naming a file) is used as it is; a str that is no file is a text when the family reads text; a PIL image,
    numpy array or tensor is written as a PNG (torchvision's to_pil_image: uint8 as it is, floats in [0, 1])."""
    files, shown = [], {}
    for i, item in enumerate(items):
        if isinstance(item, Path) or (isinstance(item, str) and (not text or Path(item).is_file())):
            files.append(str(item))
            continue
        path = tmp / f"input-{i}.txt"
        if isinstance(item, str):
            path.write_text(item)
        else:
            path = path.with_suffix(".png")
            _image(item, i).save(path)
        files.append(str(path))
        shown[str(path)] = f"<input {i}>"
    return files, shown


def _image(item: Any, i: int):
    """A PIL image of an in-memory input (a PIL image, numpy array or tensor)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    from torchvision.transforms.functional import to_pil_image

    ndim = getattr(item, "ndim", None)
    if ndim not in (2, 3):
        raise UserError(
            f"input {i}: {type(item).__name__} is not an image; give a path, a PIL image, an (H, W) or (H, W, C) "
            "array, a (C, H, W) tensor, or a list of them"
        )
    try:
        return to_pil_image(item)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"input {i}: {type(item).__name__} of shape {tuple(item.shape)} is not an image ({e})"
        ) from None


def _renamed(record: dict, shown: dict[str, str]) -> dict:
    """A record with the temporary files of in-memory inputs named as the caller knows them."""
    if not shown:
        return record
    out = {}
    for k, v in record.items():
        if isinstance(v, str):
            for tmp, name in shown.items():
                v = v.replace(tmp, name)
        out[k] = v
    return out


__all__ = ["Run", "check", "configure", "dataset", "load", "model", "recipes", "time_step", "train"]
