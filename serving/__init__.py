"""Serving: a TensorFlow Serving-compatible model server, its client and warm-up files.

Modules (import them directly; this package imports nothing heavy):

* `serving.server`   ModelServer, start_server(), serve(), main(argv): gRPC + REST
                     (`poso serve`).
* `serving.client`   predict_grpc(), predict_rest(), their client classes, and main(argv)
                     (`poso predict`: raw JSON features or TFRecords -> per-task scores).
* `serving.batching` server-side request batching; TF Serving's batching parameters file.
* `serving.warmup`   write / read assets.extra/tf_serving_warmup_requests.
* `serving.config`   models.config (ModelServerConfig) parsing and version policies.
* `serving.testing`  small SavedModels for server tests and the contract suite.

Production runs tensorflow/serving on the same files: see deploy/README.md.
"""
