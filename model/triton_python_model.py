"""Python-backend `model.py` for a tritonserver without the ONNX Runtime backend.

The pip-installed tritonserver (nvidia-pytriton) has the Python backend only, so this model runs
the production repository's model.onnx with onnxruntime itself. `python_backend_repository`
(sfpc.model.triton_python_backend) copies it next to the ONNX file as `<model>/1/model.py`; it
runs under the Python-backend stub of the triton venv, never in the gateway or in pytest.

ONNX Runtime's intra-op thread count comes from the model-config parameter
`onnxruntime_intra_op_threads` (1 when absent: the test machine's cores are shared with pytest
and a second model instance).

Every input the config lists is fed to the graph by name: `image` for the plain model, `image` and
`temperature` ([B, 1]) for the uncertainty model, `image` alone for an uncertainty model exported
before the temperature input existed. Triton refuses a request that lacks a listed input.
"""

import json
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils

# The key python_backend_repository writes; the module is copied alone, so it cannot import it.
THREADS_PARAMETER = "onnxruntime_intra_op_threads"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = onnxruntime.SessionOptions()
        threads = config.get("parameters", {}).get(THREADS_PARAMETER, {}).get("string_value")
        options.intra_op_num_threads = int(threads or 1)
        self.session = onnxruntime.InferenceSession(
            str(graph), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                feeds = {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in self.input_names
                }
                results = self.session.run(self.output_names, feeds)
                tensors = [
                    pb_utils.Tensor(name, value)
                    for name, value in zip(self.output_names, results, strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # report per request instead of failing the whole batch
                error = pb_utils.TritonError(str(exc))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
