"""Deployment: export a run to ONNX (float, or int8 by static quantization) or torch.export's .pt2 with a parity
check (export.py), and serve it over HTTP (server.py, with the web page page.html). The verbs are in cli/serve.py."""
