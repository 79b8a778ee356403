"""Uplift models: the neural multi-arm model and the tree-based T-learner baseline.

Three layers for the neural model (lightning-hydra-template style): ``network`` (plain
``nn.Module``), ``lightning`` (the LightningModule with the loss/metrics and the DataModule with
the split and tensors) and ``pyfunc`` (the self-contained MLflow model used for scoring), plus
``preprocessing`` (the JSON-serialisable feature transform shared by training and scoring).
This package imports nothing on purpose: scoring code loads ``pyfunc`` without pulling in
Lightning.
"""
