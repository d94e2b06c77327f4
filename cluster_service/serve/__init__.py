"""a fitted model without training code: the model directory, assignment scorers, the MLflow pyfunc."""
