"""Serving trained runs: a self-contained export format and an HTTP service.

* :mod:`mbrec.serving.artifact`  the artifact on disk: ``manifest.json`` + ``.npy`` arrays,
  SHA-256 checksums, :func:`~mbrec.serving.artifact.load_artifact` (numpy only, no pickle);
* :mod:`mbrec.serving.scorers`   what each model's scorer needs (extracted from a trained model)
  and the torch code that scores from it without the model or its graphs;
* :mod:`mbrec.serving.export`    ``mbrec export``: a verified run folder -> an artifact;
* :mod:`mbrec.serving.engine`    recommend / score / similar / popular over a loaded artifact;
* :mod:`mbrec.serving.app`       ``mbrec serve``: the FastAPI application (optional extra
  ``serve``), reload without downtime, admin token.

docs/serving.md describes the layout, the endpoints and the per-model scorers.
"""
