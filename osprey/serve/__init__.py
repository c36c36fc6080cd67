"""Ray Serve: the region-understanding endpoint and its web page.

- `config`: the application's typed arguments (model, segmenter, batching, limits, auth).
- `schemas`: the versioned API's request and response models (the OpenAPI schema).
- `inputs`: decoding images and masks from requests within the limits, errors naming the field.
- `errors`, `auth`: JSON error bodies; optional bearer-token authentication.
- `api`: the FastAPI app (routes, web page) over a backend of two deployment handles.
- `deployments`: the mask generator, the captioner (`@serve.batch` across requests) and the
  ingress; `app.build_app` binds them into one Serve application (`serve/app.py` exports it).
- `model_source`: any model name osprey.io.models resolves (directory, hub id, s3://,
  `models:/name@alias`), or `tiny`.
- `run`: the `osprey serve` command (like `serve run`, from serve/config.yaml).

Only `deployments` and `app` import Ray; the model is loaded in the replicas alone.
"""
