"""What is trained: datasets, models, partitions and metrics.

A *task* is a dataset loader, a model builder and the metrics that judge it. Nothing in this
package knows about Flower's runtime or Opacus: it is plain NumPy, scikit-learn and PyTorch, so
the same task runs in simulation, in deployment and in a notebook.

Modules: `config` (typed configuration), `datasets` (loaders), `registry` (named tasks),
`models`, `metrics`, `partition`, `splits` (the federated layout). What is not about a task
(files, configuration reading, seeds, errors) is in `confide.common`. Import from them
directly; this package imports nothing heavy, so a CLI that only needs a config stays fast.
"""
