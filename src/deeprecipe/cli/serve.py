"""The `export` and `serve` verbs."""

from __future__ import annotations

import importlib.util
import ipaddress
import os

from deeprecipe.cli.runs import add_run_args, open_run
from deeprecipe.core import UserError

# the import names of the serve extra's packages (pyproject.toml), by what needs them
SERVER = ("fastapi", "fastapi_offline", "uvicorn", "python_multipart", "prometheus_client")
ONNX = ("onnx", "onnxscript", "onnxruntime")


def need_serve_extra(verb: str, modules: tuple[str, ...]) -> None:
    """One line naming the extra to install when a package of it is missing (rather than a ModuleNotFoundError
    from deep inside the verb, after the model has loaded)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{verb} needs the serve extra ({', '.join(missing)} missing): pip install 'deeprecipe[serve]'")


def cmd_export(args) -> None:
    if args.format == "onnx":
        need_serve_extra("export --format onnx", ONNX)
    from deeprecipe.serve.export import export_run, int8_inputs, quantize_run

    if args.int8 and args.format != "onnx":
        raise UserError(f"--int8 makes an int8 ONNX file: use --format onnx (not {args.format})")
    if args.calibration < 1:
        raise UserError(f"--calibration {args.calibration}: give the number of training examples, at least 1")
    cfg, spec, model, _, family = open_run(args.run, "cpu", "fp32")
    if args.int8:
        int8_inputs(family, model, spec)  # refuses before the data is read
        print_int8(quantize_run(args.run, family, model, spec, cfg.data.build(), args.out, args.calibration))
        return
    s = export_run(args.run, family, model, spec, args.format, args.out, args.atol, args.rtol)
    shapes = ", ".join(f"{n} {v['shape']} ({v['dtype']})" for n, v in s["inputs"].items())
    print(f"exported {' + '.join(s['files'][:-1])} ({args.format}; summary {s['files'][-1]})")
    print(f"inputs {shapes}; dynamic axes {s['dynamic']}")
    print(f"parity with PyTorch: max |diff| {s['max_abs_diff']:.2e} within atol {s['atol']:g} + rtol {s['rtol']:g}")


def print_int8(r: dict) -> None:
    """The float and int8 files side by side: size, the score on the split, batch-1 and batch-32 latency."""
    what = {"acc": "accuracy", "miou": "mIoU", "agreement": "agreement with float (1 - relative L2 error)"}
    print(f"int8: static quantization (QDQ, per-channel weights), {r['calibration']} training examples calibrate")
    for k in ("float", "int8"):
        v, ms = r[k], r[k]["latency_ms"]
        print(
            f"{k:<5} {v['bytes'] / 2**20:8.3f} MiB  {r['metric']} {v['score']:.4f}  "
            f"batch 1 {ms[1]:.3f} ms  batch 32 {ms[32]:.3f} ms  {v['file']}"
        )
    for v, ms in r.get("variants_ms", {}).items():
        print(f"  tried {v:<10}  batch 1 {ms[1]:.3f} ms  batch 32 {ms[32]:.3f} ms")
    if r["float_nodes"]:
        print(f"kept float (measured faster on this CPU): {', '.join(r['float_nodes'])}")
    f, q = r["float"], r["int8"]
    print(
        f"{what[r['metric']]} on {r['examples']} {r['split']} examples: int8 {q['score'] - f['score']:+.4f} vs "
        f"float; its file {q['bytes'] / f['bytes']:.2f}x the size; latency: onnxruntime on this machine's CPU"
    )


def cmd_serve(args) -> None:
    import logging

    need_serve_extra("serve", SERVER)

    import uvicorn

    from deeprecipe.serve.server import ServeOptions, build_app

    token = args.token or os.environ.get("DEEPRECIPE_TOKEN") or None
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and token is None and not args.insecure:
        raise UserError(
            f"--host {args.host} exposes the model beyond this machine: set --token (or "
            "DEEPRECIPE_TOKEN), or pass --insecure to serve without one"
        )
    if args.max_batch < 1 or args.max_queue < 1 or args.wait_ms < 0 or args.max_mb <= 0:
        raise UserError("--max-batch and --max-queue must be >= 1, --wait-ms >= 0 and --max-mb > 0")
    opts = ServeOptions(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        wait_ms=args.wait_ms,
        max_bytes=int(args.max_mb * 2**20),
        token=token,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(args.run, *open_run(args.run, args.device, args.precision), opts)
    print(
        f"serving {args.run} on http://{args.host}:{args.port}/ (API docs at /docs; "
        f"token {'required' if token else 'not required'})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, access_log=args.access_log, log_level="info")


def add_parsers(sub) -> None:
    s = sub.add_parser("export", help="export a run to ONNX or torch.export (.pt2) and check it against PyTorch")
    add_run_args(s, run="run folder (its model: the weights 'eval' uses)", device=None)  # exported from the CPU
    s.add_argument("--format", default="onnx", choices=["onnx", "pt2"], help="onnx (default) | pt2 (torch.export.save)")
    s.add_argument("--out", help="output file (default RUN/export/model.onnx or model.pt2)")
    s.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 ONNX file (static quantization calibrated on the training split) and compare it "
        "with float on the test split: score, file size, latency",
    )
    s.add_argument("--calibration", type=int, default=256, help="--int8: training examples that calibrate (256)")
    s.add_argument("--atol", type=float, default=1e-4, help="parity tolerance: absolute")
    s.add_argument("--rtol", type=float, default=1e-3, help="parity tolerance: relative")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve a run over HTTP: JSON endpoints, a web page, metrics")
    add_run_args(s, run="run folder (its model: the weights 'eval' uses)", device="cpu", precision="fp32")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--token", help="bearer token required on every endpoint but /health (or DEEPRECIPE_TOKEN)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    s.add_argument("--max-batch", type=int, default=32, help="most requests per model call")
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most requests waiting per batched endpoint; past that 503 with Retry-After (default 256)",
    )
    s.add_argument("--wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    s.add_argument("--max-mb", type=float, default=8.0, help="largest request body in MiB")
    s.add_argument("--access-log", action="store_true", help="log every request (the summary is logged anyway)")
    s.set_defaults(func=cmd_serve)
