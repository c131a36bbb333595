"""Helpers shared by the test modules, imported as ``from tests.support.<module> import ...``.

- paths: the repository root and the shared real data (``../shared/data``, or $SFPC_SHARED_DATA);
- models: small SFPC networks exported with the project's exporter (trained a few steps, or
  randomly initialised), one implementation for every test that needs an export;
- server: the gateway as a real ``sfpc serve`` process, and NIfTI uploads;
- jobs: the asynchronous-jobs workloads and an independent look at the job database;
- io: edited copies of the real DICOM series, SimpleITK as reference reader, dciodvfy;
- orthanc: a real Orthanc PACS with its DICOMweb plugin;
- triton: where the tritonserver venv is, and skip-or-fail under CI (the server itself and the
  Python-backend repository are product code: sfpc.model.triton_python_backend).

Nothing outside tests/ imports these (an import-linter contract says so).
"""
