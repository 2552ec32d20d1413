"""Built-in backbone plugins: feature extractors a learner builds its model on."""
