"""Product recommendations: a top-N recommender trained on point-in-time behaviour.

:mod:`mlpkg.recommend.models` holds the interaction matrix, the factor model (``implicit``'s ALS
or BPR) and the two baselines it must beat (popularity, category affinity);
:mod:`mlpkg.recommend.pyfunc` the MLflow model that serves the factors;
:mod:`mlpkg.recommend.training` the time-split evaluation, fit, MLflow run and registration, and
the campaign stage that writes each treated customer's ranked products.
"""
