"""Model families and the pipelines diffq ships.

* :mod:`~diffq.pipelines.adapters` and :mod:`~diffq.pipelines.roles`: one adapter per diffusers
  family (where the denoiser and text encoders are, how the timestep is read, each layer's
  canonical role); the core imports these.
* :mod:`~diffq.pipelines.demo_models` (digits-sd, digits-dit, the digits-clip judge and the held-out
  digits) and :mod:`~diffq.pipelines.testing` (tiny random pipelines of every family): fixtures for
  the apps, notebooks, benchmarks and tests; the core never imports them.
"""
