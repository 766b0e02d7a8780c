"""The lab's experiments, one readable recipe per module; importing this package registers them."""

from hdopt.dynamics.experiments import eos, equilibrium, explr, localsgd, mirror, sde  # noqa: F401
