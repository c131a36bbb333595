"""The torch-free inference layer: the model contract, preprocessing, the sliding-window engine
over a backend (ONNX Runtime or Triton), uncertainty maps and statistics, the review flag, and the
upload -> artefacts pipeline that both the gateway and ``sfpc predict`` run.

Nothing here imports torch, the server or the training code (checked by import-linter)."""
