"""Recipes (rto_jax/pipeline/recipes.py) and the command line (run.py). A package, so that a recipe
imports another as `from experiments import rto`; `config.recipe` names one by path
('experiments/rto.py') or module name ('experiments.rto')."""
