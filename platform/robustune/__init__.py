"""robustune: tuned, comparable fast adversarial training on Ray Train, Ray Tune + Optuna and MLflow.

Importing the package is cheap: submodules (Ray, MLflow, torch) load only when used.
"""

__version__ = "0.1.0"
