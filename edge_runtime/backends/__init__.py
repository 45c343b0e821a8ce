"""Training backends (ONNX Runtime Training, ExecuTorch, torch-native), picked by artifact kind."""
