"""Export of pruned models (ONNX). Only this package imports onnx/onnxruntime."""
