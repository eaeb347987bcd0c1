"""Serving: a TensorFlow Serving-compatible model server, its client and warm-up files.

Modules (import them directly; this package imports nothing heavy):

* `serving.server`   ModelServer, start_server(), serve(), main(argv): gRPC + REST.
* `serving.client`   predict_grpc(), predict_rest() and their client classes.
* `serving.warmup`   write / read assets.extra/tf_serving_warmup_requests.
* `serving.config`   models.config (ModelServerConfig) parsing and version policies.
* `serving.testing`  small SavedModels for server tests and the contract suite.
"""
