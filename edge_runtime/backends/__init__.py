"""Training backends (ONNX Runtime Training, ExecuTorch), picked by artifact kind."""
