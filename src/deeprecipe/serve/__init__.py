"""Deployment: export a run to ONNX/TorchScript with a parity check (export.py), and serve it over HTTP
(server.py, with the web page page.html). The verbs are in serve/cli.py."""
