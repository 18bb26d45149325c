"""What is trained: datasets, models, partitions and metrics.

A *task* is a dataset loader, a model builder and the metrics that judge it, built in or from
an installed package (`registry`). Nothing in this package knows about Flower's runtime: it is
plain NumPy, scikit-learn and PyTorch, so the same task runs in simulation, in deployment and
in a notebook. Nor does it use Opacus, with one exception: the opt-in repair of a model for
DP-SGD (`dp_fix`, `task.fix_model`), imported lazily inside the function. It lives here
because the repair is part of building the model, which the coordinator and every
institution must do identically, and building belongs to the task.

Modules: `config` (typed configuration), `datasets` (loaders), `registry` (named tasks,
built-in and installed), `models`, `dp_fix`, `metrics`, `partition`, `splits` (the federated
layout). What is not about a task (files, configuration reading, seeds, errors) is in
`confide.common`. Import from them directly; this package imports nothing heavy, so a CLI
that only needs a config stays fast.
"""
