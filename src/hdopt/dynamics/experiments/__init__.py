"""The lab's experiments, one readable recipe per module; importing this package registers them."""

from hdopt.dynamics.experiments import equilibrium, explr  # noqa: F401
